"""Hyperparameters that follow the strategy (orchestrator/hyperparameters.py), the run's length in epochs, and the
selection metric; shown by the plan."""

from __future__ import annotations

import pytest

from orchestrator import hyperparameters
from orchestrator.config import ClassWeighting, Schedule, Strategy, Task
from orchestrator.plan import ClusterResources, describe, make_plan
from orchestrator.preflight import plan_recipe
from tests.conftest import compose_run, tiny_llama_run


def causal(tmp_path, *extra):
    return compose_run([*tiny_llama_run(), *extra], tmp_path)


@pytest.mark.parametrize("strategy,lr", [(Strategy.full, 1e-5), (Strategy.full_offload, 1e-5), (Strategy.lora, 1e-4),
                                         (Strategy.dora, 1e-4), (Strategy.qlora, 2e-4), (Strategy.ia3, 3e-3),
                                         (Strategy.prefix, 1e-2), (Strategy.prompt, 3e-2)])
def test_each_strategy_has_its_own_learning_rate_for_causal_lm(tmp_path, strategy, lr):
    resolved = hyperparameters.resolve(causal(tmp_path), strategy)
    assert resolved["optim.lr"].value == lr
    assert resolved["optim.lr"].source.startswith(f"{strategy.value} default")


def test_a_value_the_user_sets_wins(tmp_path):
    run = causal(tmp_path, "optim.lr=3e-3", "optim.schedule=constant", "trainer.epochs=2")
    resolved = hyperparameters.resolve(run, Strategy.lora)
    assert (resolved["optim.lr"].value, resolved["optim.lr"].source) == (3e-3, "set")
    assert resolved["optim.schedule"].value is Schedule.constant
    assert resolved["trainer.epochs"].value == 2 and resolved["trainer.epochs"].source == "set"
    assert resolved["optim.warmup_ratio"].value == 0.1  # the one left null comes from LoRA's row


def test_classification_defaults_measured_on_unfair_tos(tmp_path):
    run = compose_run(["logger.mode=disabled"], tmp_path)
    resolved = hyperparameters.resolve(run, Strategy.full)
    assert resolved["optim.lr"].value == 1e-4 and resolved["optim.schedule"].value is Schedule.linear
    assert resolved["optim.class_weighting"].value is ClassWeighting.balanced
    assert resolved["trainer.epochs"].value == 5
    sampled = hyperparameters.resolve(compose_run(["optim.balanced_sampling=true"], tmp_path), Strategy.full)
    assert sampled["optim.class_weighting"].value is ClassWeighting.none  # balanced batches are not weighted again


def test_max_steps_wins_over_epochs(tmp_path):
    run = causal(tmp_path, "trainer.max_steps=7", "trainer.epochs=3")
    assert "trainer.epochs" not in hyperparameters.resolve(run, Strategy.full)
    length = hyperparameters.training_length(run, None, 100, 16)
    assert (length.max_steps, length.steps_per_epoch) == (7, 7)


def test_epochs_become_steps_from_the_rows_and_the_global_batch(tmp_path):
    length = hyperparameters.training_length(causal(tmp_path), 2.5, 100, 16)
    assert (length.steps_per_epoch, length.max_steps) == (7, 18)  # ceil(100/16) = 7; 2.5 x 7 = 17.5 -> 18
    assert "2.5 epochs x 7 steps" in length.reason


def test_selection_metric(tmp_path):
    assert hyperparameters.selection_metric(compose_run([], tmp_path)) == "macro_f1"
    assert hyperparameters.selection_metric(causal(tmp_path)) == "loss"
    assert hyperparameters.selection_metric(compose_run(["trainer.select_metric=eval/accuracy"], tmp_path)) == \
        "accuracy"


def test_the_plan_prints_and_keeps_the_one_gpu_lora_fallback_rate(tmp_path):
    """The issue: legal_full on one GPU falls back to LoRA and kept the full fine-tuning rate of 1e-5."""
    run = compose_run(["+experiment=legal_full", "dry_run=true"], tmp_path)
    from orchestrator.model import read_model_config

    resources = ClusterResources(nodes=1, gpus_per_node=1, gpu_memory_gb=80, cpus=16)
    plan = make_plan(run, resources, read_model_config(run.model, shape_only=True))
    plan_recipe(run, plan, train_rows=3200, apply=True)
    assert plan.strategy is Strategy.lora
    assert plan.hyperparameters["optim.lr"]["value"] == 1e-4 and run.optim.lr == 1e-4
    assert plan.max_steps == 3 * 50 and run.trainer.max_steps == 150  # 3 epochs of 3200 rows / 64
    text = describe(plan, 80)
    assert "optim.lr=0.0001" in text and "lora default" in text and "3 epochs x 50 steps" in text
    assert '"optim.lr"' in plan.to_json()


def test_unset_rates_stay_unset_where_another_process_runs_the_run(tmp_path):
    run = causal(tmp_path)
    plan = make_plan(run, ClusterResources(1, 0, None, 2), {"model_type": "llama", "hidden_size": 64,
                                                            "num_hidden_layers": 2, "num_attention_heads": 4,
                                                            "intermediate_size": 128, "vocab_size": 1000})
    plan_recipe(run, plan, train_rows=None, apply=False)  # launcher=rayjob: the pods resolve them again
    assert run.optim.lr is None and plan.hyperparameters["optim.lr"]["value"] == 1e-5
    assert "counted where the run starts" in plan.steps_reason


def test_task_is_needed_for_the_defaults():
    assert hyperparameters.defaults_for(Strategy.ia3, Task.classification).lr == 3e-3  # its causal LM row
