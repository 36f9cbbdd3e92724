"""Issue 17 through the real CLI, on one tiny training: a starter file written by `orchestrator init` trains as
is (with the command line's keys that make it tiny); the run leaves checkpoints at every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

CONSOLE_SCRIPT = Path(sys.executable).parent / "orchestrator"
ENV = {**os.environ, "WANDB_MODE": "disabled"}
STEPS = 3
TINY = [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3",
        "trainer.micro_batch_size=2", "cluster.cpu_workers=2", "data.max_length=64", "data.max_validation_rows=2",
        "trainer.eval_generate_rows=0", "trainer.select_best=false", "logger.mode=disabled"]


def orchestrator(*args, cwd, timeout=600):
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, its checkpoints by step): `orchestrator init --model tiny_llama`, then
    `orchestrator train tiny.yaml <tiny keys>` with 2 CPU workers (ZeRO-3 shards on two ranks)."""
    home = tmp_path_factory.mktemp("run-file")
    written = orchestrator("init", "--model", "tiny_llama", "--out", "tiny.yaml", cwd=home, timeout=120)
    assert written.returncode == 0, written.stderr
    run_dir = home / "run"
    result = orchestrator("train", "tiny.yaml", *TINY, f"hydra.run.dir={run_dir}", cwd=home)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoints = {}
    for marker in run_dir.glob("checkpoints/*/*/checkpoint_*/complete/rank_0.json"):
        checkpoints[json.loads(marker.read_text())["step"]] = marker.parents[1]
    return run_dir, checkpoints


def test_an_init_file_trains_as_is(trained):
    run_dir, checkpoints = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["train/loss_history"]) == STEPS
    assert (run_dir / "export" / "config.json").is_file() and list((run_dir / "export").glob("*.safetensors"))
    assert sorted(checkpoints) == [1, 2, 3]
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "name: tiny" in config and "path: builtin:tiny-llama" in config
