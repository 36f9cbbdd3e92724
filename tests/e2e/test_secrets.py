"""Secrets stay in the environment: a planted W&B key and Hugging Face token never appear in any file of
the run (config, plan, metrics, checkpoints, export, W&B offline files), its console output, or the logs
of the Ray cluster that ran it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_llama_run

pytestmark = pytest.mark.ray


def files_containing(secret: bytes, roots, since: float = 0.0):
    hits = []
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if path.is_file() and path.stat().st_mtime >= since and secret in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # a log rotated away while we read
                continue
    return hits


def test_planted_secrets_never_reach_a_file_or_log(tmp_path):
    secret = f"planted-secret-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the test session's WANDB_MODE=disabled
    env.update(WANDB_API_KEY=secret, HF_TOKEN=secret)
    run_dir = tmp_path / "run"
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", *tiny_llama_run(logger="offline"), "data.max_length=96",
         "data.max_validation_rows=4", "trainer.max_steps=2", "trainer.checkpoint_every=1",
         "trainer.micro_batch_size=2", "cluster.cpu_workers=2", "trainer.eval_generate_rows=0",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert (run_dir / "export" / "config.json").is_file() and list(run_dir.rglob("wandb/*"))
    assert secret.encode() not in result.stdout + result.stderr
    ray_logs = [p for p in Path("/tmp/ray").glob("session_*") if p.is_dir()] if Path("/tmp/ray").is_dir() else []
    assert files_containing(secret.encode(), [run_dir, *ray_logs], since=started) == []
