"""trainer.save_final=false (benchmarks, smoke runs): the run's metrics still reach the driver, nothing is
exported, and a second run in the same directory (resume=auto: without it the directory is refused) starts afresh
instead of "resuming" from the metrics-only report the first one left behind."""

from __future__ import annotations

import math

import pytest

from orchestrator.__main__ import execute
from orchestrator.errors import UserError
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray


def test_metrics_without_a_saved_model_and_a_clean_rerun(ray_cluster, tmp_path):
    overrides = [*tiny_llama_run(), "trainer.max_steps=2", "trainer.micro_batch_size=2", "cluster.cpu_workers=1",
                 "data.max_length=64", "data.max_validation_rows=2", "trainer.eval_generate_rows=0",
                 "trainer.save_final=false", "data.packing=true"]
    # runs/<name>/<run> as the CLI lays them out: resume=auto looks through the run directory's parent, which is
    # then this test's own (pytest's base directory holds every other test's runs too)
    run_dir = tmp_path / "run"
    first = execute(compose_run(overrides, run_dir))
    assert len(first["train/loss_history"]) == 2 and all(math.isfinite(x) for x in first["train/loss_history"])
    assert len(first["train/step_s_history"]) == 2 and all(t > 0 for t in first["train/tokens_history"])
    assert not (run_dir / "export").exists()

    # the same run directory again: refused without resume= (run identity), and resume=auto finds nothing to
    # continue, since a metrics-only checkpoint holds no weights: a clean rerun with the same losses
    with pytest.raises(UserError, match="resume=auto"):
        execute(compose_run(overrides, run_dir))
    second = execute(compose_run([*overrides, "resume=auto"], run_dir))
    assert second["train/loss_history"] == pytest.approx(first["train/loss_history"], rel=1e-6)
    assert "train/restarts" not in second


def test_micro_batch_left_to_the_planner(ray_cluster, tmp_path):
    """trainer.micro_batch_size=null: on CPU workers the planner takes each worker's rows in one pass; the run
    trains with that layout and holds the pick afterwards (evaluation batches, the model card)."""
    import json

    run = compose_run([*tiny_llama_run(), "trainer.max_steps=1", "trainer.micro_batch_size=null",
                       "trainer.global_batch_size=4", "cluster.cpu_workers=1", "data.max_length=64",
                       "data.max_validation_rows=2", "trainer.eval_generate_rows=0", "trainer.save_final=false"],
                      tmp_path)
    metrics = execute(run)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert (plan["micro_batch_size"], plan["grad_accum"], plan["global_batch_size"]) == (4, 1, 4)
    assert plan["micro_batch_reason"].startswith("4: all 4 rows per worker in one pass")
    assert run.trainer.micro_batch_size == 4 and math.isfinite(metrics["train/loss_history"][0])
