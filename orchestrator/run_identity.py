"""A run's identity, so that a new run never continues another by accident.

Ray Train treats a storage directory that holds checkpoints as the same run resuming: two runs sharing
`cluster.storage_path` (or the same `hydra.run.dir`) would otherwise look like one, and the second would train on
from the first's checkpoint and schedule. So every run gets a run id on the driver when it starts, and with it:

- its own place in the storage: Ray Train's run is `<storage>/<name>/<run id>/checkpoint_*` (run_storage), so a
  rerun of an experiment (the same storage URI on Kubernetes) starts fresh beside the earlier ones;
- `<run_dir>/run.json` (run id, name, storage, what it resumed from); a run directory that already holds another
  run's outputs is refused unless `resume=` is given (check_run_dir): another run's export, metrics and progress
  are not overwritten by surprise;
- the run id in every rank's checkpoint marker: a restart of the run (Ray Train's, after a worker failure) takes
  only checkpoints its own run wrote (restarts.restart_checkpoint).

Continuing is only what `resume=` asks for (auto: the newest complete checkpoint of this experiment's runs; or a
named checkpoint or run directory), or a restart of the same run: Ray Train's, after a worker failure, or a
launcher's retry of the whole driver, which says so by setting ORCHESTRATOR_RUN_ID to the run id it gave the run
(e.g. a RayJob's name, for k8s.backoff_limit): the same id in the same run directory continues that run's own
checkpoints.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from typing import Any, Dict, Optional

from orchestrator.checkpoint import Location, join, read_markers, storage_root
from orchestrator.config import RunConfig
from orchestrator.errors import UserError
from orchestrator.files import write_json_atomically

RUN_FILE = "run.json"  # in the run directory: which run wrote it
# what a run leaves in its run directory (run.json since run ids; the others before them too)
RUN_OUTPUTS = (RUN_FILE, "progress.json", "metrics.json", "export")


RUN_ID_ENV = "ORCHESTRATOR_RUN_ID"  # set by a launcher that retries a run's driver: the run's id, kept across retries


def new_run_id() -> str:
    """Sortable and readable: the driver's start time (UTC) and 6 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def given_run_id() -> Optional[str]:
    """ORCHESTRATOR_RUN_ID where a launcher set it (checked: it names a directory), else None."""
    value = os.environ.get(RUN_ID_ENV)
    if not value:
        return None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
        raise UserError(f"{RUN_ID_ENV}={value} is not allowed: up to 128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return value


def ray_run_name(run: RunConfig, run_id: str) -> str:
    """Ray Train's run name: under the experiment's name, one directory per run."""
    return f"{run.name}/{run_id}"


def run_storage(run: RunConfig, run_id: Optional[str]) -> str:
    """Where Ray Train writes this run's checkpoints (without a run id: the experiment's directory, as before): a
    local path, or a URI where cluster.storage_path is one."""
    experiment = join(storage_root(run), run.name)
    return join(experiment, run_id) if run_id else experiment


def check_run_dir(run: RunConfig) -> None:
    """Before anything is written: a run directory holding another run's outputs is continued only with resume=
    (the requested value, before it is resolved); else a UserError says what to do."""
    if run.resume:
        return
    found = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(run.run_dir, name))]
    if not found:
        return
    previous = read_run_file(run.run_dir)
    if previous.get("run_id") and previous["run_id"] == given_run_id():
        return  # the launcher retries this very run: it continues its own checkpoints (restarts.py)
    who = f"run {previous['run_id']}" if previous.get("run_id") else f"an earlier run ({', '.join(found)})"
    raise UserError(f"{run.run_dir} already holds {who}: add resume=auto to continue it, or give this run its own "
                    f"directory (leave hydra.run.dir at its default, pick another, or delete {run.run_dir})")


def claim_run(run: RunConfig) -> str:
    """On the driver as training starts: the run's id (new, or ORCHESTRATOR_RUN_ID's), written to <run_dir>/run.json.
    A progress file left by another run (the one this one resumes) is removed: it would count that run's steps as
    repeated by this one. A retry of the same run keeps it: its steps are repeated."""
    run_id = given_run_id() or new_run_id()
    progress = os.path.join(run.run_dir, "progress.json")
    if os.path.exists(progress) and read_run_file(run.run_dir).get("run_id") != run_id:
        os.remove(progress)
    write_json_atomically(os.path.join(run.run_dir, RUN_FILE),
                          {"run_id": run_id, "name": run.name, "started_at": time.time(),
                           "storage": run_storage(run, run_id), "resumed_from": run.resume})
    return run_id


def read_run_file(run_dir: str) -> Dict[str, Any]:
    import json

    try:
        with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def written_by(checkpoint_path: Location) -> Optional[str]:
    """The run id in a checkpoint's markers (a local path, a URI or Ray's Checkpoint); None where it cannot be told
    (no markers there, or written before run ids)."""
    markers, _ = read_markers(checkpoint_path)
    ids = {m.get("run_id") for m in markers}
    return ids.pop() if len(ids) == 1 else None
