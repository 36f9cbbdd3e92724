"""Strategy and Precision as typed str enums: what each strategy means, that they still read, compare and
serialise as their names (plan.json unchanged), and build_model's adapter-only input gradients."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.config import Init, ModelConfig, Precision, RunConfig, Strategy, Task
from orchestrator.model import build_model, read_model_config
from orchestrator.plan import ClusterResources, Plan, make_plan

# strategy -> (uses_adapters, low_rank, mergeable, quantized, full_parameters, offloads)
MEANING = {
    Strategy.auto: (False, False, False, False, False, False),
    Strategy.full: (False, False, False, False, True, False),
    Strategy.full_offload: (False, False, False, False, True, True),
    Strategy.lora: (True, True, True, False, False, False),
    Strategy.qlora: (True, True, False, True, False, False),
    Strategy.dora: (True, True, True, False, False, False),
    Strategy.ia3: (True, False, True, False, False, False),
    Strategy.prefix: (True, False, False, False, False, False),
    Strategy.prompt: (True, False, False, False, False, False),
}


@pytest.mark.parametrize("strategy", list(Strategy))
def test_each_strategy_says_what_it_is(strategy):
    assert (strategy.uses_adapters, strategy.low_rank, strategy.mergeable, strategy.quantized,
            strategy.full_parameters, strategy.offloads) == MEANING[strategy]


def test_the_adapter_strategies():
    assert tuple(s for s in Strategy if s.uses_adapters) == ("lora", "qlora", "dora", "ia3", "prefix", "prompt")


@pytest.mark.parametrize("member,name", [(Strategy.full_offload, "full_offload"), (Precision.bf16, "bf16")])
def test_enums_read_compare_and_serialise_as_their_names(member, name):
    assert member == name and type(member)(name) is member and type(member)(member) is member
    assert (str(member), f"{member}", f"{member:>14}", json.dumps(member)) == (name, name, f"{name:>14}", f'"{name}"')


def test_precision_torch_dtype():
    assert (Precision.bf16.torch_dtype, Precision.fp32.torch_dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="auto"):
        Precision.auto.torch_dtype


def test_plan_holds_enums_and_writes_their_names():
    run = RunConfig(model=ModelConfig(path="builtin:tiny-llama"))
    plan = make_plan(run, ClusterResources(nodes=1, gpus_per_node=1, gpu_memory_gb=80, cpus=8),
                     read_model_config(run.model))
    assert plan.strategy is Strategy.lora and plan.precision is Precision.bf16
    assert all(isinstance(c.strategy, Strategy) for c in plan.candidates)
    written = json.loads(plan.to_json())
    assert (written["strategy"], written["precision"]) == ("lora", "bf16")
    assert [c["strategy"] for c in written["candidates"]] == ["full", "full_offload", "lora", "qlora"]
    assert all(type(c["strategy"]) is str for c in written["candidates"])


def test_a_plan_built_from_strings_holds_enums():
    plan = Plan(strategy="full", num_workers=1, use_gpu=False, micro_batch_size=1, grad_accum=1,
                global_batch_size=1, precision="fp32", zero_stage=3, offload=False, gradient_checkpointing=False,
                predicted_gib_per_gpu=None, reason="test")
    assert plan.strategy is Strategy.full and plan.precision is Precision.fp32


@pytest.mark.parametrize("strategy,hooked", [("full", False), ("full_offload", False), ("lora", True),
                                             (Strategy.prefix, True)])
def test_checkpointed_model_gets_input_gradients_only_for_adapters(monkeypatch, strategy, hooked):
    """full_offload trains its embeddings like full: build_model adds no require-grads hook (it used to).
    transformers' own checkpointing switch (which adds the hook itself in recent versions) is stubbed out,
    so that the hook is build_model's alone."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", lambda self, **kwargs: None)
    cfg = ModelConfig(path="builtin:tiny-llama", task=Task.causal_lm, init=Init.random,
                      config_overrides={"num_hidden_layers": 2})
    model = build_model(cfg, None, torch.float32, strategy, gradient_checkpointing=True)
    assert hasattr(model, "_require_grads_hook") is hooked
