"""A one-worker run whose recipe runs in the driver's own process (cluster.in_process; plan.choose_launch decides).

Ray Train's local mode (ScalingConfig(num_workers=0)) calls the training function here, with its ray.train API (the
context, report, get_checkpoint) served in this process, and Ray itself is never started: no Ray Train controller,
placement group or worker process, whose start took 19-20 s of the ~50 s to the first step on one H200
(bench/RESULTS.md, "Command to first step on one H200"). What Ray Train's workers would have given the recipe is
provided here instead:

  the process group  torch.distributed for a world of one, on a free port (process_group_of_one)
  checkpoints        written into the run's storage by the recipe itself, as Ray Train lays them out and keeping the
                     newest trainer.keep_checkpoints (orchestrator/in_process_storage.py); local mode stores none
  restarts           an exception from the training function (not a UserError, nor Ctrl-C) runs it again here, from
                     the newest complete checkpoint, up to trainer.max_failures times (fit_with_restarts)
  progress           a LocalFeed for the ProgressView (orchestrator/progress.py)
  the worker's log   the recipe sends this process's stdout and stderr to <run_dir>/logs/worker_0.log as a worker
                     does (logs.redirect_worker_output); the console keeps the original stdout, and both come back
                     when training ends (console_kept)
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
import time
import traceback
import warnings

from orchestrator.config import RunConfig
from orchestrator.errors import UserError
from orchestrator.plan import Plan


def fit_in_process(run: RunConfig, plan: Plan):
    """TorchTrainer.fit() in Ray Train's local mode, in this process. Returns (Ray Train's Result, the metrics
    measured after the final checkpoint, when fit() was called), as launch.local.fit_on_ray."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from rich.console import Console

    from orchestrator import console
    from orchestrator.checkpoint import storage_root
    from orchestrator.logs import logs_dir
    from orchestrator.progress import LocalFeed, ProgressSender, ProgressView, nothing_to_place
    from orchestrator.run_identity import claim_run, ray_run_name
    from orchestrator.train_loop import WorkerInput

    run_id = claim_run(run)  # this run's own place in the storage, and <run_dir>/run.json
    feed = LocalFeed()
    worker = WorkerInput(run, plan, feed=feed, run_id=run_id, in_process=True)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Running in local mode", each report's metrics
    trainer = TorchTrainer(train_here, train_loop_config={"worker": worker},
                           scaling_config=ray.train.ScalingConfig(num_workers=0),  # local mode
                           run_config=ray.train.RunConfig(name=ray_run_name(run, run_id),
                                                          storage_path=storage_root(run)))
    os.makedirs(logs_dir(run.run_dir), exist_ok=True)
    console.note(f"logs: {logs_dir(run.run_dir)}/ (the training's output in worker_0.log: it runs in this process)")
    with console_kept() as out:
        view = ProgressView(feed, terminal=out.isatty(), console=Console(file=out, highlight=False, soft_wrap=True),
                            placement=nothing_to_place)
        fit_started_at = time.time()  # for the start-up account: before this, imports and the plan (no Ray)
        with view:
            result = fit_with_restarts(trainer, run, plan, ProgressSender(feed))
    return result, view.late_metrics, fit_started_at


def fit_with_restarts(trainer, run: RunConfig, plan: Plan, sender):
    """trainer.fit(), each time in a process group of its own. After an exception (a UserError, a Ctrl-C and the
    like are not failures of the worker: they end the run), up to trainer.max_failures times again, as Ray Train
    restarts a failed worker: the recipe continues from the run's newest complete checkpoint
    (restarts.restart_checkpoint) and says so, as a restarted worker does."""
    failures = 0
    while True:
        try:
            with process_group_of_one(plan.use_gpu), worker_hooks_undone():
                return trainer.fit()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - what Ray Train counts as a worker failure
            failures += 1
            if failures > run.trainer.max_failures:
                raise
            log_failure(run.run_dir)
            sender.send("warning", text=f"training failed ({type(err).__name__}: {err}); restarting from the newest "
                                        f"complete checkpoint, restart {failures} of trainer.max_failures="
                                        f"{run.trainer.max_failures} (the traceback: logs/worker_0.log)")
        release_memory()  # outside the except block: the exception and the failed recipe's frames are gone


def log_failure(run_dir: str) -> None:
    """The exception being handled, with its traceback, into logs/worker_0.log, where a worker's goes."""
    from orchestrator.logs import logs_dir

    with open(os.path.join(logs_dir(run_dir), "worker_0.log"), "a", encoding="utf-8") as log:
        log.write(traceback.format_exc())


def train_here(config) -> None:
    """The recipe (train_loop.train_loop), then what it leaves in this process that a worker's end would take with
    it: its process group, destroyed through DeepSpeed, which forgets the groups it made of it (Ray Train's local mode
    destroys the group through torch alone, and the next fit here, a restart or another run, would find DeepSpeed's
    groups of the old one, unknown to the new); and transformers' note of its ZeRO-3 config, which an exception's
    traceback may keep alive, and under which any model built here later would be built for ZeRO-3."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from orchestrator.train_loop import train_loop

    try:
        train_loop(config)
    finally:
        destroy_process_group()
        unset_hf_deepspeed_config()
        forget_deepspeed_globals()
        release_memory()


def forget_deepspeed_globals() -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps at module level after a run, which in a worker the process's end drops and
    which here kept the finished run's model, optimizer state and engine alive (22 GiB of a 1B full run still
    allocated during the next run of the GPU test session, 2026-12-01): the list its forward hooks push the model on
    (parameter_offload.FWD_MODULE_STACK, left holding it) and the class-level lru_cache of
    PartitionedParameterCoordinator.__params_to_release, keyed by the coordinator. Nothing is mid-forward once the
    recipe has returned; both are rebuilt by the next engine. tests/integration/test_in_process.py checks that no
    engine outlives its run."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()
    coordinator = getattr(sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator"),
                          "PartitionedParameterCoordinator", None)
    for attribute in vars(coordinator).values() if coordinator is not None else ():
        for cached in _lru_caches(attribute):
            cached.cache_clear()


def _lru_caches(function, depth: int = 0) -> list:
    """functools.lru_cache wrappers inside `function`: itself, or through its decorators' closures (DeepSpeed's
    instrument_w_nvtx wraps without functools.wraps)."""
    if hasattr(function, "cache_clear"):
        return [function]
    if depth > 3 or not callable(function):
        return []
    inner = [getattr(function, "__wrapped__", None)]
    inner += [cell.cell_contents for cell in getattr(function, "__closure__", None) or () if _cell_filled(cell)]
    return [cache for f in inner if f is not None for cache in _lru_caches(f, depth + 1)]


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def destroy_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and getattr(comm, "cdb", None) is not None:  # DeepSpeed adopted the group
        comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def release_memory() -> None:
    """What the failed attempt's engine held (its model, optimizer state, CUDA cache) freed before the next one."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


TORCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def process_group_of_one(use_gpu: bool):
    """torch.distributed for a world of one, on a free port of this machine, with the environment Ray Train gives a
    worker (DeepSpeed reads it; the recipe adopts the group: train_loop.setup_worker); afterwards the group is
    destroyed and the environment put back, so that the next fit (a restart, another run) sets up its own. Without
    LOCAL_WORLD_SIZE: with it, Ray Train's local mode would set up a group itself (its torchrun mode), with NCCL
    wherever CUDA is, even for a plan on CPU workers."""
    import torch.distributed as dist

    saved = {key: os.environ.get(key) for key in TORCH_ENV}
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"})
    try:
        dist.init_process_group("nccl" if use_gpu else "gloo", init_method="env://", rank=0, world_size=1)
        yield
    finally:
        destroy_process_group()  # train_here did, unless the fit failed before the recipe started
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def console_kept():
    """A stream on this process's stdout as it is now, for the console while the recipe has descriptors 1 and 2
    written to its log (logs.redirect_worker_output); both descriptors put back afterwards."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8")
    try:
        yield out
    finally:
        for stream in (sys.stdout, sys.stderr, out):
            with contextlib.suppress(ValueError, OSError):
                stream.flush()
        for descriptor, original in zip((1, 2), saved):
            os.dup2(original, descriptor)
            os.close(original)
        out.close()


@contextlib.contextmanager
def worker_hooks_undone():
    """What the recipe hooks into its process for rank 0's warnings (progress.forward_own_warnings) undone when it
    ends: in the driver, later warnings are not sent to a feed nobody reads, and the next attempt (a restart) or run
    hooks in afresh, rather than around the last one's hook (which would send each warning twice)."""
    shown = warnings.showwarning
    own = logging.getLogger("orchestrator")
    handlers = list(own.handlers)
    try:
        yield
    finally:
        warnings.showwarning = shown
        own.handlers = handlers
