"""Every experiment composes; bad keys and values stop the CLI with one line naming them and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.config import Strategy, Task
from orchestrator.errors import UserError
from tests.conftest import ROOT, compose_run

EXPERIMENTS = sorted(p.stem for p in (ROOT / "hydra_conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    run = compose_run([f"+experiment={experiment}"], tmp_path)
    assert run.name == experiment
    # the legal experiments leave the strategy to the planner; a model recipe names its own
    # (tests/unit/test_recipes.py checks that each plans it)
    assert run.strategy is Strategy.auto if experiment.startswith("legal_") else run.strategy is not Strategy.auto


def test_legal_full_is_a_causal_lm_on_instructions(tmp_path):
    run = compose_run(["+experiment=legal_full"], tmp_path)
    assert run.model.task is Task.causal_lm
    assert run.data.path == "sample:legal_instructions"
    assert "Llama" in run.model.path


def test_overrides_reach_the_schema(tmp_path):
    run = compose_run(["optim.lr=3e-4", "trainer.max_steps=7", "model.freeze_depth=2", "strategy=full"], tmp_path)
    assert (run.optim.lr, run.trainer.max_steps, run.model.freeze_depth) == (3e-4, 7, 2)
    assert run.strategy is Strategy.full


def test_validation_rejects_out_of_range_values(tmp_path):
    with pytest.raises(UserError, match=r"peft.rank=0 is not allowed"):
        compose_run(["peft.rank=0"], tmp_path)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_the_composed_config():
    result = cli("+experiment=legal_demo", "optim.lr=0.001", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.001" in result.stdout and "name: legal_demo" in result.stdout


def test_missing_model_weights_say_how_to_point_at_a_local_copy(tmp_path):
    result = cli("+experiment=legal_full", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert "model.path=meta-llama/Llama-3.1-8B-Instruct is neither a local directory" in result.stderr
    assert "set model.path=/models/Llama-3.1-8B-Instruct" in result.stderr


def test_dry_run_prints_the_plan_and_writes_plan_json(tmp_path):
    result = cli("dry_run=true", "cluster.gpus=0", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr
    assert "strategy=full" in result.stdout
    assert (tmp_path / "run" / "plan.json").is_file()


def test_dry_run_plans_a_hub_model_from_its_known_shape_without_weights(tmp_path):
    result = cli("+experiment=legal_full", "dry_run=true", "cluster.gpus=8", "cluster.gpu_memory_gb=80",
                 f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr
    assert "strategy=full\n" in result.stdout
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["num_workers"] == 8 and plan["strategy"] == "full"
    assert {c["strategy"] for c in plan["candidates"]} == {"full", "full_offload", "lora", "qlora"}
