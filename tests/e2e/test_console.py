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
    r"plan: ", r"why: ", r"fused kernels: ", r"steps: ", r"selection: ", r"hyperparameters: ",
    r"logs: \S+/logs/ \(the training workers' output in worker_<rank>\.log, Ray's own processes in \S+/logs/ray/\)$",
    r"step \d+/3, epoch 1/1, loss \d+\.\d{4}, lr \S+, \d+\.\d rows/s, elapsed \w+, ETA \w+$",  # the progress
    r"legal_demo: validation before and after 3 steps",
    r"[┏┃┡│└]",  # the before/after table
    r"time: \d+s in all; first step after \d+s; ",
    r"start-up \d+s: imports, Ray and the plan \d+\.\ds, Ray Train starting the workers ",  # console.startup_account
    r"nodes: \d+; ranks \S+ on ",  # where the ranks ran (orchestrator/placement.py)
    r"export: \S+/export$",
    r"plot: \S+\.png$",
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_demo_run_prints_only_the_products_lines(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "+experiment=legal_demo", "trainer.max_steps=3", "logger.mode=disabled",
         "data.max_validation_rows=40", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    console = ANSI.sub("", result.stdout + result.stderr)
    assert result.returncode == 0, console[-3000:]
    lines = [line for line in console.splitlines() if line.strip()]
    strangers = [line for line in lines if not any(re.match(pattern, line) for pattern in ALLOWED)]
    assert strangers == [], "lines outside the product's own:\n" + "\n".join(strangers)
    assert "Traceback" not in console
    assert sum(line.startswith("step ") for line in lines) >= 2 and lines[-1].startswith("plot: ")
    logs = run_dir / "logs"
    assert (logs / "worker_0.log").is_file() and (logs / "worker_1.log").is_file()
    assert (logs / "ray").is_dir() and list((logs / "ray").glob("*.out"))  # Ray's processes' own files
