"""Start a Plan on Ray: an embedded local Ray by default, or the existing cluster at cluster.address; a one-worker
run where nothing needs Ray runs in this process instead (cluster.in_process: launch/in_process.py).

Ray only places the workers, wires the process group and collects reports and checkpoints;
the DeepSpeed engine lives in orchestrator.train_loop.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional, Sequence

import psutil

from orchestrator.checkpoint import EXPORT_DIR, copy_out, is_uri, storage_root
from orchestrator.config import ClusterConfig, RunConfig
from orchestrator.errors import UserError
from orchestrator.plan import ClusterResources, Plan

# NVLink SHARP / multicast stays off: the lent multi-GPU machines (and many clouds) do not support it.
# Expandable segments: ZeRO-3's gather/free cycle of differently sized buffers otherwise fragments the
# CUDA caching allocator (measured: 28.6 GiB reserved for 22.4 GiB allocated, bench/RESULTS.md).
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
QUIET_ENV = {"RAY_DEDUP_LOGS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}


def set_process_env() -> None:
    """GPU_ENV and QUIET_ENV in this process's environment (a user's own settings win), where Ray's workers get them
    too (start_ray) and a run in this process reads them (cluster.in_process)."""
    for key, value in {**GPU_ENV, **QUIET_ENV}.items():
        os.environ.setdefault(key, value)


def start_ray(cluster: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    set_process_env()
    env_vars = {k: os.environ[k] for k in GPU_ENV}
    if cluster.address:  # the cluster's nodes need not have the project: the driver ships it (launch/ship.py)
        from launch.ship import code_runtime_env

        ray.init(address=cluster.address, runtime_env={"env_vars": env_vars, **code_runtime_env()},
                 logging_level="WARNING",
                 log_to_driver=False)  # its processes' output stays in their log files (orchestrator/logs.py)
        return
    # Ray's default for a new local cluster, token authentication, is what we want: no WARNING saying it is on
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: not record.getMessage().startswith("Token authentication is enabled"))
    # Embedded cluster: dashboard (which serves Ray Train's state API) on loopback only; one logical CPU
    # more than the workers need, as Ray Train's controller takes a slot (the workers share the real cores).
    ray.init(num_cpus=max(os.cpu_count() or 1, cluster.cpu_workers + 1), include_dashboard=None,
             dashboard_host="127.0.0.1", runtime_env={"env_vars": env_vars}, logging_level="WARNING",
             log_to_driver=False)


def detect_resources(cluster: ClusterConfig, ray_started: bool) -> ClusterResources:
    """What the plan is for: the cluster.* overrides where given (sizing), else what Ray (or the local
    machine, for a dry run without Ray) reports."""
    import torch

    if ray_started:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        gpus_per_node = max((int(n["Resources"].get("GPU", 0)) for n in nodes), default=0)
        cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
        node_count = len(nodes)
        host_memory = min((n["Resources"].get("memory", 0) for n in nodes), default=0) / 2**30 or None
    else:  # no Ray: this machine as start_ray's embedded Ray would report it (a dry run), or sizing
        gpus_per_node = torch.cuda.device_count()
        cpus = max(os.cpu_count() or 1, cluster.cpu_workers + 1)
        node_count = 1
        # sizing for another cluster (cluster.gpus given): its host memory is what the user says, if anything
        host_memory = None if cluster.gpus is not None else ray_memory_gb()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    memory = cluster.gpu_memory_gb if cluster.gpu_memory_gb is not None else memory
    nodes = cluster.nodes if cluster.nodes is not None else node_count
    gpus_per_node = cluster.gpus if cluster.gpus is not None else gpus_per_node
    if cluster.gpu_fraction is not None and gpus_per_node:  # a share of one GPU: a one-worker run on part of it
        nodes, gpus_per_node = 1, 1
        memory = memory * cluster.gpu_fraction if memory is not None else None
    return ClusterResources(
        nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gb=memory, cpus=cpus,
        host_memory_gb=cluster.host_memory_gb if cluster.host_memory_gb is not None else host_memory,
    )


def ray_memory_gb() -> float:
    """GiB of the "memory" resource an embedded Ray would offer on this machine (available memory less its object
    store), computed as Ray does without starting it; psutil's estimate where Ray's helpers are not found."""
    try:
        from ray._private.utils import estimate_available_memory, resolve_object_store_memory

        available = estimate_available_memory()
        return (available - resolve_object_store_memory(available)) / 2**30
    except (ImportError, AttributeError, TypeError):
        return 0.7 * psutil.virtual_memory().available / 2**30


def run_training(run: RunConfig, plan: Plan):
    """Fit on Ray Train's workers, or in this process (plan.in_process: launch/in_process.py); copy the consolidated
    export to <run_dir>/export. Returns Ray Train's Result."""
    if plan.in_process:
        from launch.in_process import fit_in_process

        result, late_metrics, fit_started_at = fit_in_process(run, plan)
    else:
        result, late_metrics, fit_started_at = fit_on_ray(run, plan)
    if run.trainer.save_final:
        export_from(result.checkpoint, os.path.join(run.run_dir, "export"))
    if result.metrics is not None:  # measured after the final checkpoint (Recipe.finish): optional evaluations
        result.metrics.update(late_metrics)
        result.metrics["time/fit_started_at"] = fit_started_at
        result.metrics["launch/in_process"] = plan.in_process
    return result


def fit_on_ray(run: RunConfig, plan: Plan):
    """TorchTrainer.fit() on Ray Train's workers. Returns (Ray Train's Result, the metrics measured after the final
    checkpoint, when fit() was called)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from orchestrator import console
    from orchestrator.logs import link_ray_logs
    from orchestrator.progress import ProgressView, start_feed
    from orchestrator.restarts import FaultDrill, elastic_worker_counts
    from orchestrator.run_identity import claim_run, ray_run_name
    from orchestrator.train_loop import WorkerInput, train_loop

    # trainer.elastic: the worker counts a restart may continue on, checked before anything starts
    counts = elastic_worker_counts(run, plan) if run.trainer.elastic else [plan.num_workers]
    start_ray(run.cluster)  # started for the plan already, unless the run was planned to need none
    feed = start_feed()  # rank 0's progress, notes and warnings, drawn on this console (orchestrator/progress.py)
    run_id = claim_run(run)  # this run's own place in the storage, and <run_dir>/run.json
    worker = WorkerInput(run, plan, feed=feed, fault=FaultDrill.from_environment(run.run_dir), run_id=run_id)
    loop_config = {"worker": ray.put(worker)}  # by reference: only the workers unpickle it (train_loop.train_loop)
    trainer = interrupt_noting(elastic_over(TorchTrainer, counts))(
        train_loop,
        train_loop_config=loop_config,
        # PACK (Ray's default, said here): fill one node's GPUs before the next, so NCCL stays on NVLink within a node.
        # Elastic: (fewest, planned) workers; Ray Train restarts on as many as it can place (elastic_over)
        scaling_config=ray.train.ScalingConfig(num_workers=(counts[0], plan.num_workers) if len(counts) > 1
                                               else plan.num_workers, use_gpu=plan.use_gpu,
                                               placement_strategy="PACK",
                                               resources_per_worker=worker_resources(run, plan)),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=ray_run_name(run, run_id), storage_path=storage_root(run),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.trainer.keep_checkpoints),
            # a failed worker (crash, lost node, killed process): restart them all from the last checkpoint
            failure_config=ray.train.FailureConfig(max_failures=run.trainer.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress bar says enough
        ),
    )
    console.note(link_ray_logs(run.run_dir))  # where the libraries' output went (orchestrator/logs.py)
    if len(counts) > 1:
        fewer = ", ".join(str(c) for c in reversed(counts[:-1]))
        console.note(f"elastic: where a restart cannot place all {plan.num_workers} workers, the run continues on "
                     f"{fewer} worker(s), keeping the global batch of {plan.global_batch_size} rows "
                     f"(more accumulation; trainer.min_workers={counts[0]})")
    view = ProgressView(feed, terminal=sys.stdout.isatty(), needs=worker_needs(run, plan))
    fit_started_at = time.time()  # for the start-up account: before this, imports, Ray's start and the plan
    try:
        with view:
            result = fit(trainer)
    except Exception as err:  # a UserError raised inside a worker arrives wrapped by Ray
        user_error = _find_user_error(err)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        ray.kill(feed)
    return result, view.late_metrics, fit_started_at


def worker_needs(run: RunConfig, plan: Plan) -> dict:
    """The Ray resources the run's workers take together, for the console's note when their start waits."""
    per_worker = worker_resources(run, plan) or ({"GPU": 1} if plan.use_gpu else {"CPU": 1})
    return {kind: amount * plan.num_workers for kind, amount in per_worker.items() if kind in ("GPU", "CPU")}


def worker_resources(run: RunConfig, plan: Plan) -> Optional[dict]:
    """Ray's default (a GPU, or a CPU, per worker), or a share of one GPU (cluster.gpu_fraction): several small
    one-worker runs then train on one GPU at once, as a sweep's trials do where their plans fit together."""
    fraction = run.cluster.gpu_fraction
    if not plan.use_gpu or fraction is None or fraction >= 1:
        return None
    return {"GPU": fraction, "CPU": 1}


ELASTIC_START_TIMEOUT_ENV, ELASTIC_START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 20


def elastic_over(trainer_class, worker_counts: Sequence[int]):
    """The trainer class, whose Ray Train controller restarts only on the given worker counts (those that keep
    the global batch: orchestrator.restarts.elastic_scaling_policy); the class itself where there is one count."""
    if len(worker_counts) < 2:
        return trainer_class
    from orchestrator.restarts import elastic_scaling_policy

    class Elastic(trainer_class):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["scaling_policy"] = elastic_scaling_policy(self.scaling_config, list(worker_counts))
            # A restart decided before Ray has noticed that a node is gone asks for all the workers, and waits for
            # them this long (Ray's default: 60 s) before it decides again, on what is left. The controller reads it
            # from the driver's environment as it starts (a user's own setting wins).
            own = os.environ.get(ELASTIC_START_TIMEOUT_ENV)
            os.environ[ELASTIC_START_TIMEOUT_ENV] = own or str(ELASTIC_START_TIMEOUT_S)
            try:
                return super()._initialize_and_run_controller(**controller_init_kwargs)
            finally:
                if own is None:
                    os.environ.pop(ELASTIC_START_TIMEOUT_ENV, None)

    Elastic.__name__ = Elastic.__qualname__ = trainer_class.__name__
    return Elastic


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


def interrupt_noting(trainer_class):
    """The trainer class, noting a Ctrl-C in `interrupted`. Ray Train (v2) handles SIGINT during fit() itself: it
    aborts the workers and ends the driver with SystemExit(0), so that without this a stopped run exits as if it
    had succeeded (or with a traceback, on a second Ctrl-C)."""
    import signal

    class Noting(trainer_class):
        interrupted = False

        def _register_sigint_handler(self, controller):  # called by fit() on the main thread
            super()._register_sigint_handler(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def noted(signum, frame):
                self.interrupted = True
                if callable(ray_handler):
                    ray_handler(signum, frame)

            signal.signal(signal.SIGINT, noted)

    Noting.__name__ = Noting.__qualname__ = trainer_class.__name__
    return Noting


def fit(trainer):
    """trainer.fit(); after a Ctrl-C, KeyboardInterrupt, whatever Ray Train made of it (main() then says what was
    kept and exits with EXIT_INTERRUPTED)."""
    try:
        result = trainer.fit()
    except BaseException:
        if getattr(trainer, "interrupted", False):
            raise KeyboardInterrupt from None
        raise
    if getattr(trainer, "interrupted", False):
        raise KeyboardInterrupt
    return result


def report_interrupt(run: Optional[RunConfig], overrides: Sequence[str] = ()) -> int:
    """Ctrl-C: one line on stderr saying what was kept (the run's newest complete checkpoint, verified) and the
    command that resumes from it. Returns EXIT_INTERRUPTED."""
    import json
    import shlex
    import warnings

    from orchestrator.checkpoint import newest_complete_checkpoint

    kept, storage = None, None
    if run is not None and not run.dry_run:
        try:  # this run's own storage, as it claimed it (<run_dir>/run.json), else the run's storage root
            with open(os.path.join(run.run_dir, "run.json"), encoding="utf-8") as handle:
                storage = json.load(handle).get("storage")
        except (OSError, ValueError, AttributeError):
            pass
        storage = storage or storage_root(run)
        with warnings.catch_warnings():  # the checkpoint being written when Ctrl-C came is incomplete: not news
            warnings.simplefilter("ignore")
            try:  # a URI is read through its filesystem (an object store: over the network)
                kept = newest_complete_checkpoint([storage])
            except Exception:  # noqa: BLE001 - unreachable storage: the line below says where to look
                kept = None
    if kept is None and storage and is_uri(storage):
        sys.stderr.write(f"interrupted: the run's complete checkpoints are kept in {storage}; resume with the same "
                         "command and resume=auto\n")
    elif kept is None:
        sys.stderr.write("interrupted: no checkpoint was complete yet, nothing was kept; run the command again to "
                         "start over\n")
    else:
        again = shlex.join(["python", "-m", "orchestrator", *[o for o in overrides if not o.startswith("resume=")],
                            f"resume={kept.path}"])
        sys.stderr.write(f"interrupted: kept the last complete checkpoint, step {kept.step}, at {kept.path}; "
                         f"resume with: {again}\n")
    return EXIT_INTERRUPTED


def export_from(checkpoint, destination: str) -> None:
    """The final checkpoint's export, copied to a local directory: from an object store only the export is
    downloaded (checkpoint.copy_out), not the shards."""
    copy_out(checkpoint, EXPORT_DIR, destination)


def _find_user_error(err: BaseException) -> Optional[UserError]:
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return UserError(str(current).splitlines()[0] if str(current) else "")
        stack += [current.__cause__, current.__context__]
        stack += list(getattr(current, "worker_failures", {}).values() if isinstance(
            getattr(current, "worker_failures", None), dict) else [])
    return None
