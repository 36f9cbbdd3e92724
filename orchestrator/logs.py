"""Where the libraries' chatter goes: log files in <run_dir>/logs, not the console.

The console shows the product's own lines (the plan, the progress, notes, warnings that need the user, errors).
Everything else is written here:
  logs/worker_<rank>.log   each training worker's stdout and stderr (DeepSpeed, torch, transformers, Ray Train)
  logs/ray                 a link to Ray's log directory of this session: its own processes (the Train
                           controller, placement group cleaner, raylet, GCS), on the driver's machine
Ray no longer copies its processes' output to the driver (ray.init(log_to_driver=False), launch/local.py); errors
of a run still reach the console as the driver's exception, and warnings of orchestrator's own code through
rank 0's progress feed (orchestrator/progress.py).
"""

from __future__ import annotations

import os
import sys

LOGS_DIR = "logs"


def logs_dir(run_dir: str) -> str:
    return os.path.join(run_dir, LOGS_DIR)


def link_ray_logs(run_dir: str) -> str:
    """<run_dir>/logs (created) with `ray` pointing at this session's Ray log directory. Returns the line that
    names them, for the console."""
    directory = logs_dir(run_dir)
    os.makedirs(directory, exist_ok=True)
    link = os.path.join(directory, "ray")
    try:
        import ray._private.worker as ray_worker

        target = ray_worker._global_node.get_logs_dir_path()  # noqa: SLF001 - Ray has no public call for it
        if os.path.islink(link):
            os.unlink(link)
        if not os.path.exists(link):
            os.symlink(target, link)
        ray_part = f", Ray's own processes in {link}/"
    except (AttributeError, ImportError, OSError):
        ray_part = ""
    return f"logs: {directory}/ (the training workers' output in worker_<rank>.log{ray_part})"


def redirect_worker_output(run_dir: str, rank: int) -> None:
    """This worker process's stdout and stderr (file descriptors 1 and 2: Python's and C++'s alike) into
    <run_dir>/logs/worker_<rank>.log, appended (a restarted worker adds to it). Where the run directory is not on
    this machine (a worker on another node of cluster.address), Ray's own log files keep them."""
    directory = logs_dir(run_dir)
    if not os.path.isdir(directory):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(os.path.join(directory, f"worker_{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
