"""The code a run needs on an existing Ray cluster (cluster.address): the driver ships its own orchestrator and
launch packages as Ray `py_modules`, so that the workers import the very code the driver runs, also on nodes where
the project is not installed (or an older version is). The packages are small (under 1 MiB, no weights or data);
Ray uploads them once per content hash to the cluster's object store and unpacks them on each node.

Where the driver already runs inside a Ray job that carries the code (`ray job submit --working-dir . -- python
-m orchestrator ...`), that job's runtime environment does the shipping and nothing is added."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

SHIPPED_PACKAGES = ("orchestrator", "launch")
EXCLUDES = ["__pycache__/", "*.pyc", ".pytest_cache/", "*.whl"]


def code_runtime_env() -> Dict[str, Any]:
    """runtime_env entries that ship the project's packages: {} where the submitted job carries code already."""
    if job_carries_code():
        return {}
    return {"py_modules": package_dirs(), "excludes": list(EXCLUDES)}


def package_dirs() -> List[str]:
    """The directories of the packages this driver imports (a checkout's, or the installed ones)."""
    import importlib

    return [str(Path(importlib.import_module(name).__file__).resolve().parent) for name in SHIPPED_PACKAGES]


def job_carries_code() -> bool:
    """Whether this driver is the entrypoint of a submitted Ray job whose runtime env has working_dir or
    py_modules (Ray's job manager passes the job's config in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(runtime_env.get("working_dir") or runtime_env.get("py_modules"))
