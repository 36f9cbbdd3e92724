"""The console of a successful run shows the product's own lines only: a short demo through the CLI (3 steps, W&B
off) prints no line outside the small set below, no traceback, no `(RayTrainWorker pid=...)` or other Ray
process prefix, no Ray/DeepSpeed/C++ log line; what the libraries said is in the log files the `logs:` line names.
A new kind of console line belongs in ALLOWED only when it is one of ours."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.ray

ALLOWED = [  # each console line of the run matches one of these, from its start
    r"data: classification, \d+ train rows, \d+ validation rows$",
    r"train labels: ",
    r"data report \(classification\):$",
    r"  (train|validation): \d+ rows → \d+ examples, ",
    r"  labels: ",
    r"strategy=\w+$",
    r"plan: ", r"why: ", r"fused kernels: ", r"steps: ", r"selection: ", r"launch: ", r"hyperparameters: ",
    r"logs: \S+/logs/ \(the training workers' output in worker_<rank>\.log, Ray's own processes in \S+/logs/ray/\)$",
    r"logs: \S+/logs/ \(the training's output in worker_0\.log: it runs in this process\)$",  # cluster.in_process
    r"step \d+/3, epoch 1/1, loss \d+\.\d{4}, lr \S+, \d+\.\d rows/s, elapsed \w+, ETA \w+$",  # the progress
    r"legal_demo: validation before and after 3 steps",
    r"[┏┃┡│└]",  # the before/after table
    r"time: \d+s in all; first step after \d+s; ",
    r"start-up \d+s: imports, Ray and the plan \d+\.\ds, Ray Train starting the workers ",  # console.startup_account
    r"start-up \d+s: imports and the plan \d+\.\ds, worker setup ",  # the same, in this process: no Ray
    r"nodes: \d+; ranks? \S+ on ",  # where the ranks ran (orchestrator/placement.py)
    r"export: \S+/export$",
    r"plot: \S+\.png$",
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("workers", [2, 1])  # Ray Train's workers; one, in this process (cluster.in_process=auto)
def test_a_demo_run_prints_only_the_products_lines(tmp_path, workers):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "+experiment=legal_demo", "trainer.max_steps=3", "logger.mode=disabled",
         "data.max_validation_rows=40", f"cluster.cpu_workers={workers}", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    console = ANSI.sub("", result.stdout + result.stderr)
    assert result.returncode == 0, console[-3000:]
    lines = [line for line in console.splitlines() if line.strip()]
    strangers = [line for line in lines if not any(re.match(pattern, line) for pattern in ALLOWED)]
    assert strangers == [], "lines outside the product's own:\n" + "\n".join(strangers)
    assert "Traceback" not in console
    assert sum(line.startswith("step ") for line in lines) >= 2 and lines[-1].startswith("plot: ")
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.glob("worker_*.log")) == [f"worker_{rank}.log" for rank in range(workers)]
    if workers == 1:  # no Ray started: nothing of Ray's to link
        assert not (logs / "ray").exists()
    else:
        assert (logs / "ray").is_dir() and list((logs / "ray").glob("*.out"))  # Ray's processes' own files
