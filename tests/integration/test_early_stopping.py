"""A sweep trial that falls behind its peers' median at an evaluation stops there, still exports, and says so."""

from __future__ import annotations

import json

import pytest

from orchestrator import early_stopping
from orchestrator.__main__ import execute
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray


def test_a_trial_behind_the_median_stops_at_the_evaluation(ray_cluster, tiny_llama_dir, tmp_path):
    for peer in ("0", "1"):  # two finished trials of the same sweep that reached a far lower loss by step 2
        (tmp_path / peer).mkdir()
        early_stopping.record(str(tmp_path / peer), 2, 0.5)
    run = compose_run([*tiny_llama_run(tiny_llama_dir), "strategy=lora", "trainer.max_steps=6", "trainer.eval_every=2",
                       "trainer.micro_batch_size=2", "trainer.eval_generate_rows=0", "cluster.cpu_workers=1",
                       "data.max_length=96", "data.max_validation_rows=4", "trainer.early_stopping=true"],
                      tmp_path / "2")
    metrics = execute(run)
    assert metrics["train/stopped_early_at"] == 2
    assert len(metrics["train/loss_history"]) == 2 and metrics["step"] == 2
    assert (tmp_path / "2" / "export" / "config.json").is_file()  # the stopped trial's model is still exported
    history = json.loads((tmp_path / "2" / early_stopping.HISTORY_FILE).read_text())
    assert float(history["2"]) > 0.5
