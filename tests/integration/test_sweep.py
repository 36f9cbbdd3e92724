"""A 4-trial sweep through the CLI (`python -m orchestrator -m ...`): trials of a tiny LoRA model run at the same
time on one Ray cluster, at most two at once; one trial (a LoRA target the model lacks) fails inside its Ray
worker and is listed as failed while the other three finish; the summary, plot and best overrides are written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, compose_run, tiny_llama_run

pytestmark = pytest.mark.ray

TARGETS = ["[q_proj,v_proj]", "[q_proj]", "[v_proj]", "[no_such_module]"]
FIXED = [*tiny_llama_run(), "strategy=lora", "trainer.eval_generate_rows=0", "trainer.max_steps=2",
         "trainer.micro_batch_size=2", "data.max_length=96", "data.max_validation_rows=4", "cluster.cpu_workers=1"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "-m", *FIXED, f"peft.target_modules={','.join(TARGETS)}",
         "hydra.launcher.max_concurrent=2", f"hydra.sweep.dir={directory}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return directory


def trials(sweep_dir):
    return [json.loads((sweep_dir / str(n) / "trial.json").read_text()) for n in range(len(TARGETS))]


def test_trials_run_at_the_same_time_within_the_cap(sweep_dir):
    spans = [(t["started_at"], t["finished_at"]) for t in trials(sweep_dir)]
    # the trained trials take time; the invalid one is refused by its preflight before it takes any
    assert all(start < end for (start, end), t in zip(spans, trials(sweep_dir)) if t["status"] == "completed")
    assert all(start <= end for start, end in spans)

    def running_at(moment):
        return sum(start <= moment < end for start, end in spans)

    most = max(running_at(start) for start, _ in spans)
    assert most == 2, f"expected two trials at once (max_concurrent=2), saw {most}: {spans}"


def test_summary_lists_every_trial_and_the_failed_one_as_failed(sweep_dir):
    with open(sweep_dir / "summary.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["peft.target_modules"] for row in table] == TARGETS
    assert [row["status"] for row in table] == ["completed"] * 3 + ["failed"], (sweep_dir / "summary.md").read_text()
    for row in table[:3]:
        assert float(row["eval/loss"]) > 0 and float(row["tokens_per_s"]) > 0
    assert "no_such_module" in table[3]["error"] and table[3]["eval/loss"] == ""
    for n in range(3):  # every trial in its own run directory, as a single run
        assert (sweep_dir / str(n) / "metrics.json").is_file() and (sweep_dir / str(n) / "export").is_dir()
    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown.count("| completed |") == 3 and markdown.count("| failed |") == 1
    assert (sweep_dir / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_best_overrides_are_the_best_trial_and_compose_as_a_run(sweep_dir, tmp_path):
    done = [t for t in trials(sweep_dir) if t["status"] == "completed"]
    best = min(done, key=lambda t: t["value"])
    overrides = (sweep_dir / "best_overrides.txt").read_text().split()
    assert overrides == [*FIXED, f"peft.target_modules={TARGETS[best['num']]}"]
    run = compose_run(overrides, tmp_path)
    assert run.peft.target_modules == TARGETS[best["num"]].strip("[]").split(",")
