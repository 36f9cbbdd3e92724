"""Where the configs and the KubeRay templates are: inside the package (orchestrator.hydra_conf and
orchestrator.k8s, as an installed or editable orchestrator has them: pyproject.toml), or else beside it in the
source tree it was imported from (`python -m orchestrator` at the root of a clone whose orchestrator is installed
elsewhere, or not at all, so that the package mapping is not the one in use)."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parents[1]  # the checkout's root, when imported from one


def shipped(name: str) -> bool:
    """Whether orchestrator.<name> (hydra_conf, k8s) is importable, i.e. the package carries it."""
    try:
        return importlib.util.find_spec(f"orchestrator.{name}") is not None
    except ImportError:
        return False


def package_dir(name: str) -> Path:
    """The directory of orchestrator.<name>, else <source tree>/<name>."""
    return Path(str(resources.files(f"orchestrator.{name}"))) if shipped(name) else SOURCE_TREE / name


def hydra_config_path() -> str:
    """@hydra.main's config_path: the package's configs through Hydra's pkg:// search path, else the source
    tree's hydra_conf/ as an absolute path."""
    return "pkg://orchestrator.hydra_conf" if shipped("hydra_conf") else str(SOURCE_TREE / "hydra_conf")
