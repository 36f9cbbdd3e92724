"""Restarts inside a run: which checkpoint a restarted worker continues from, how many steps it repeats,
and the failure drill that kills a worker on purpose (ORCHESTRATOR_KILL_WORKER)."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import ray.train

from orchestrator.checkpoint import Place, as_checkpoint, checkpoint_info, metrics_only, newest_complete_checkpoint
from orchestrator.config import RunConfig
from orchestrator.files import write_json_atomically
from orchestrator.run_identity import run_storage, written_by


def restart_checkpoint(run: RunConfig, run_id: Optional[str] = None) -> Optional[ray.train.Checkpoint]:
    """The checkpoint a (re)started worker continues from: None on the run's first start. Ray hands back the last
    checkpoint it registered; one that every rank had finished writing may be newer (registration lags the reports,
    and may not have happened at all when a worker dies soon after a save), so take the newer of the two. With a
    run id (run_identity.py) the run's storage directory is its own: a complete checkpoint there is this run's,
    registered or not, and a registered one whose markers name another run is not continued."""
    registered = ray.train.get_checkpoint()  # (filesystem, path): the storage's, a URI's included
    if registered is not None and metrics_only(registered):
        return None  # only a finished run's metrics (trainer.save_final=false)
    if registered is not None and run_id and Place.of(registered).is_dir() and \
            written_by(registered) not in (None, run_id):
        warnings.warn(f"not restarting from {Place.of(registered).name}: run {written_by(registered)} wrote it, not "
                      f"this run ({run_id})", stacklevel=2)
        registered = None
    if registered is None and not run_id:
        return None  # the experiment's directory may hold other runs' checkpoints: only Ray's word counts
    on_disk = newest_complete_checkpoint([run_storage(run, run_id)])
    registered_info = (checkpoint_info(registered) if registered is not None and Place.of(registered).is_dir()
                       else None)
    if on_disk is not None and (registered_info is None or on_disk.step > registered_info.step):
        return as_checkpoint(on_disk.path)  # a local path or a URI, on the storage's filesystem
    return registered


class Progress:
    """The last finished step, in a file beside the run: after a restart it tells how many steps repeat."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def last_step(self) -> int:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return int(json.load(handle)["step"])
        except (OSError, ValueError, KeyError):
            return 0

    def record(self, step: int) -> None:
        if self.enabled:
            write_json_atomically(self.path, {"step": step, "time": time.time()})


@dataclass
class FaultDrill:
    """ORCHESTRATOR_KILL_WORKER=<rank>:<step> on the driver: that worker kills itself as it starts that step,
    once per run (the marker file says it happened), to exercise Ray Train's restart and our resume. Every rank
    first completes its checkpoint in flight (trainer.async_checkpoint: Recipe.train), so the restart continues
    from the newest checkpoint before that step, as it would after synchronous saves."""

    rank: int
    step: int
    marker: str

    @classmethod
    def from_environment(cls, run_dir: str) -> Optional["FaultDrill"]:
        value = os.environ.get("ORCHESTRATOR_KILL_WORKER")
        if not value:
            return None
        rank, step = (int(part) for part in value.split(":"))
        return cls(rank, step, os.path.join(run_dir, ".fault_injected"))

    def strike(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.step or os.path.exists(self.marker):
            return
        open(self.marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def elastic_worker_counts(run: RunConfig, plan) -> list:
    """trainer.elastic: the worker counts, fewest first, that the run may continue on after a failure (from
    trainer.min_workers, default 1, to the plan's), each one that keeps the global batch (Plan.for_workers: workers x
    micro-batch must divide it). A UserError where the run cannot be elastic: a strategy whose checkpoints cannot be
    re-partitioned (the planner's pick, where strategy=auto), or no count below the plan's that keeps the batch."""
    from orchestrator.errors import UserError

    lowest = run.trainer.min_workers or 1
    if plan.strategy.value not in ("full", "full_offload"):
        raise UserError(f"trainer.elastic=true is not allowed with strategy={plan.strategy.value} (the plan's): only "
                        "strategy=full and full_offload checkpoints can be re-partitioned onto fewer workers; set "
                        "strategy=full, or trainer.elastic=false")
    if lowest > plan.num_workers:
        raise UserError(f"trainer.min_workers={lowest} is not allowed: the plan has {plan.num_workers} worker(s); "
                        f"set it to at most {plan.num_workers}")
    counts = []
    for workers in range(lowest, plan.num_workers + 1):
        try:
            counts.append(plan.for_workers(workers).num_workers)
        except UserError:
            continue
    if counts == [plan.num_workers] and lowest < plan.num_workers:
        raise UserError(f"trainer.min_workers={lowest} is not allowed: the global batch of {plan.global_batch_size} "
                        f"rows cannot be kept on any of {lowest}-{plan.num_workers - 1} worker(s) x micro-batch "
                        f"{plan.micro_batch_size}; set trainer.min_workers=1, or a global batch that fewer workers "
                        "divide")
    return counts


def elastic_scaling_policy(scaling_config, worker_counts: list):
    """Ray Train's elastic policy (ScalingConfig(num_workers=(min, max))), restarting only on a worker count that
    keeps the global batch: the largest of worker_counts that the cluster can place. Ray's own would take any count
    in the range (3 of 4 workers for a global batch that 3 do not divide). The class is made here, so that it is
    pickled by value to Ray Train's controller, which then imports nothing of ours (nor torch)."""
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    allowed = sorted(worker_counts)

    class GlobalBatchKeeping(ElasticScalingPolicy):
        def _count_possible_workers(self, reserved_resources) -> int:
            placeable = super()._count_possible_workers(reserved_resources)
            return max((count for count in allowed if count <= placeable), default=0)

        def make_decision_for_non_running_worker_group(self):
            import time

            from ray.train.v2._internal.execution.scaling_policy import NoopDecision

            self.deciding_a_restart = True  # the cluster as it is now, not as of the coordinator's last tick (20 s)
            try:
                decision = super().make_decision_for_non_running_worker_group()
            finally:
                self.deciding_a_restart = False
            # fewer than min_workers can be placed: Ray Train asks again at once, and its waiting would keep a core busy
            if isinstance(decision, NoopDecision):
                time.sleep(1)
            return decision

        def _get_reserved_resources(self):
            import time

            import ray

            if not getattr(self, "deciding_a_restart", False) or \
                    time.monotonic() - getattr(self, "recomputed_at", float("-inf")) < 1:
                return super()._get_reserved_resources()
            self.recomputed_at = self._latest_reserved_resources_query_time = time.monotonic()
            try:  # the coordinator re-reads the nodes (a dead one drops out once Ray's health check has found it)
                self._latest_reserved_resources = ray.get(self._autoscaling_coordinator.get_reserved_resources.remote(
                    self._requester_id, recompute=True), timeout=5)
            except Exception:  # noqa: BLE001 - as Ray's own: no resize on this round
                return super()._get_reserved_resources()
            return self._latest_reserved_resources

    return GlobalBatchKeeping(scaling_config=scaling_config)
