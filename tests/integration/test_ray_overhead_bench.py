"""bench/ray_overhead.py times the product's own step (Recipe.build_engine + Recipe.train_step): under torchrun with
one CPU worker on the tiny Llama it finishes and reports a step time and the recipe's loss. The bench reaches into
the recipe's phases, so a change there that breaks it fails here rather than on the next GPU call."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_runs_the_recipes_step_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, "bench/ray_overhead.py", "--device", "cpu", "--model", "builtin:tiny-llama",
                           "--workers", "1", "--seq", "32", "--micro-batch", "2", "--warmup", "1", "--steps", "4",
                           "--variants", "torchrun", "--variant-timeout-s", "300", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = json.loads((tmp_path / "ray_overhead.json").read_text())["rows"][0]
    assert row["rc"] == 0, (tmp_path / "variants.log").read_text()[-3000:]
    assert row["step_s"] > 0 and len(row["host_step_s"]) == 5
    assert math.isfinite(row["final_loss_per_token"])
    # random tokens on a randomly initialised model: the per-token loss the recipe reports is near ln(vocab)
    assert len(row["losses"]) == 5
    assert all(abs(loss - math.log(row["vocab_size"])) < 1.0 for loss in row["losses"]), row["losses"]
