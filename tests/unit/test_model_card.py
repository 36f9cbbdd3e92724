"""The model card's Training table shows what the run trained with, resolved by the plan (issue 15): the batch
layout, precision, steps and the hyperparameters the strategy filled in, never `auto` or a formula."""

from __future__ import annotations

import json

from orchestrator.config import config_dict
from orchestrator.model_card import write_model_card
from orchestrator.plan import Plan
from tests.conftest import compose_run

HYPERPARAMETERS = {"optim.lr": {"value": 1e-4, "source": "full default"},
                   "optim.schedule": {"value": "linear", "source": "full default"},
                   "optim.warmup_ratio": {"value": 0.1, "source": "full default"},
                   "trainer.epochs": {"value": 5.0, "source": "classification default"}}


def demo_plan() -> Plan:
    return Plan(strategy="full", num_workers=2, use_gpu=False, micro_batch_size=16, grad_accum=1,
                global_batch_size=32, precision="fp32", zero_stage=3, offload=False, gradient_checkpointing=False,
                predicted_gib_per_gpu=None, reason="no GPU", max_steps=55, hyperparameters=HYPERPARAMETERS)


def training_table(text: str) -> dict:
    section = text.split("## Training")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].lstrip("| "): cells[1].rstrip(" |").strip("`") for cells in rows[1:]}


def config(tmp_path) -> dict:
    """The demo's config as the CLI hands it over: precision auto, micro-batch and learning rate as configured."""
    return config_dict(compose_run(["trainer.micro_batch_size=null", "trainer.global_batch_size=32"], tmp_path))


def test_the_training_table_shows_the_plan_resolved(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    raw = config(tmp_path)
    assert raw["trainer"]["precision"] == "auto" and raw["trainer"]["micro_batch_size"] is None
    table = training_table(open(write_model_card(str(export), raw, {"step": 55}, plan=demo_plan())).read())
    assert table["global batch"] == "32 = 2 CPU worker(s) x 16 micro-batch x 1 accumulation"
    assert table["micro-batch per worker"] == "16"
    assert table["precision"] == "fp32"
    assert table["learning rate"] == "0.0001" and table["schedule"] == "linear, warmup 0.1"
    assert table["epochs"] == "5.0" and table["optimizer steps"] == "55"
    assert table["DeepSpeed"] == "ZeRO stage 3"
    assert "auto" not in table.values() and not any("micro x" in v for v in table.values())


def test_the_run_directory_plan_is_read_when_none_is_given(tmp_path):
    (tmp_path / "plan.json").write_text(demo_plan().to_json())
    export = tmp_path / "export"
    export.mkdir()
    table = training_table(open(write_model_card(str(export), config(tmp_path), {"step": 40})).read())
    assert table["precision"] == "fp32" and table["optimizer steps"] == "40 of 55 planned"
    assert table["global batch"].startswith("32 = 2 CPU worker(s)")
    assert json.loads((tmp_path / "plan.json").read_text())["strategy"] == "full"


def test_without_a_plan_unresolved_rows_are_left_out(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    table = training_table(open(write_model_card(str(export), config(tmp_path), {}, strategy="full")).read())
    assert "precision" not in table and "micro-batch per worker" not in table
    assert table["global batch"] == "32"
    assert "auto" not in table.values() and not any("micro x" in v for v in table.values())
