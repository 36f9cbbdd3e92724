"""Fixtures of the GPU suite: the assets (tokenizer, test model, data) made once per session, one run per name
trained once per session through orchestrator.__main__.execute in this process (on the session's one Ray, the
`ray_cluster` fixture of tests/conftest.py), and a record of what each test measured, printed at the end and written
as JSON lines to $GPU_SUITE_RECORD (scripts/test-gpu.sh points it into $OUT).

Nothing here runs at import: on a machine without a GPU the test modules skip before any fixture is asked for.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

_RECORDS: List[Dict[str, Any]] = []


@dataclass
class Assets:
    tokenizer: Path  # byte-level BPE, VOCAB tokens (support.build_tokenizer)
    model: Path  # the test Llama, bf16 safetensors + tokenizer (support.build_model_dir)
    data: Path  # plain-text train/validation rows from the bundled legal instructions
    long_data: Path  # the same, training rows four times over: packed rows of 2048 tokens for the memory runs


@pytest.fixture(scope="session")
def gpu_assets(tmp_path_factory) -> Assets:
    from tests.gpu import support

    root = tmp_path_factory.mktemp("gpu-assets")
    tokenizer = support.build_tokenizer(root / "tokenizer")
    return Assets(tokenizer=tokenizer, model=support.build_model_dir(root / "model", tokenizer),
                  data=support.write_text_data(root / "data"),
                  long_data=support.write_text_data(root / "long_data", repeat=4))


@dataclass
class Trained:
    name: str
    run: Any  # the RunConfig it ran with
    run_dir: Path
    metrics: Dict[str, Any]
    plan: Dict[str, Any]
    seconds: float  # execute() alone, Ray Train's start of the workers included
    extra: Dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="session")
def train(ray_cluster, tmp_path_factory) -> Callable[..., Trained]:
    """train(name, overrides) -> Trained: the run of that name, trained once per session (a second test asking
    for it gets the first's result, or the first's failure again: a failed run is not paid for twice)."""
    from orchestrator.__main__ import execute
    from tests.conftest import compose_run
    from tests.gpu.support import run_plan

    done: Dict[str, Any] = {}

    def run_named(name: str, overrides: List[str]) -> Trained:
        if name in done:
            if isinstance(done[name], BaseException):
                pytest.fail(f"the run {name!r} failed earlier in this session: {type(done[name]).__name__}: "
                            f"{done[name]}", pytrace=False)
            return done[name]
        run_dir = tmp_path_factory.mktemp(name) / "run"  # one level below its own directory, as the CLI lays runs
        run = compose_run(overrides, run_dir)
        started = time.perf_counter()
        try:
            metrics = execute(run)
        except BaseException as err:
            done[name] = err
            raise
        seconds = time.perf_counter() - started
        done[name] = Trained(name, run, run_dir, metrics, run_plan(run_dir), seconds)
        print(f"run {name}: {seconds:.1f} s in execute(), {run_dir}")
        return done[name]

    return run_named


@pytest.fixture
def record(request) -> Callable[..., None]:
    """record(**figures): what this test measured, for the end-of-session table and $GPU_SUITE_RECORD."""

    def write(**figures: Any) -> None:
        entry = {"test": request.node.nodeid, **figures}
        _RECORDS.append(entry)
        path: Optional[str] = os.environ.get("GPU_SUITE_RECORD")
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, default=str) + "\n")

    return write


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RECORDS:
        return
    terminalreporter.section("GPU suite: what each test measured")
    for entry in _RECORDS:
        figures = ", ".join(f"{k}={_short(v)}" for k, v in entry.items() if k != "test")
        terminalreporter.write_line(f"{entry['test']}: {figures}")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 12:
        return f"[{', '.join(map(_short, value[:3]))}, ..., {', '.join(map(_short, value[-3:]))}]"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)
