"""Freeze depth and the peft strategies on CPU, in-process (no Ray): each method trains only its adapter,
and an exported merged model gives the same logits as the adapter model it came from."""

from __future__ import annotations

import pytest
import torch

from orchestrator.adapters import apply_adapter, export_adapted
from orchestrator.config import Init, ModelConfig, PeftConfig, Task
from orchestrator.errors import UserError
from orchestrator.memory import ModelShape
from orchestrator.model import build_model, freeze_bottom_layers, read_model_config

TINY = ModelConfig(path="builtin:tiny-llama", tokenizer_path="minilm", task=Task.causal_lm, init=Init.random)


def tiny_llama(freeze_depth: int = 0, layers: int = 4):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, "freeze_depth": freeze_depth,
                         "config_overrides": {"num_hidden_layers": layers}})
    return build_model(cfg, None, torch.float32)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("depth", [0, 1, 3, 4])
def test_freeze_depth_freezes_embeddings_and_exactly_k_blocks(depth):
    model = tiny_llama(depth)
    shape = ModelShape.from_config({**read_model_config(TINY), "num_hidden_layers": 4})
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    embedding = model.model.embed_tokens.weight.numel()
    expected = total if depth == 0 else total - embedding - depth * block
    assert trainable(model) == expected
    assert block == shape.block_params  # the planner's arithmetic counts the same blocks


def test_freeze_depth_on_an_encoder_freezes_all_embedding_tables():
    from orchestrator.config import ModelConfig as M

    model = build_model(M(path="minilm"), ["A", "B"], torch.float32)
    freeze_bottom_layers(model, 2)
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"embeddings", "encoder"}
    assert all(p.requires_grad for n, p in model.named_parameters() if ".layer.2." in n or "classifier" in n)


def test_freeze_depth_beyond_the_layers_is_an_error():
    with pytest.raises(UserError, match=r"model.freeze_depth=5 is not allowed: this model has 4 layers"):
        tiny_llama(5)


def one_step(model) -> dict:
    """One AdamW step on a fixed batch; returns the parameters before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 1000, (2, 12))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("strategy", ["lora", "dora", "ia3", "prefix", "prompt"])
def test_each_peft_method_trains_only_its_adapter(strategy):
    model = apply_adapter(tiny_llama(), strategy, PeftConfig(rank=4, virtual_tokens=5), Task.causal_lm)
    before = one_step(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "the adapter trained"
    assert all(model.get_parameter(n).requires_grad for n in changed)
    assert trainable(model) < 0.5 * sum(p.numel() for p in model.parameters())


def test_lora_with_freeze_depth_adapts_only_the_upper_blocks():
    model = apply_adapter(tiny_llama(freeze_depth=3), "lora", PeftConfig(rank=4), Task.causal_lm, freeze_depth=3)
    adapted = {n.split("layers.")[1].split(".")[0] for n, p in model.named_parameters() if "lora_" in n}
    assert adapted == {"3"}


@pytest.mark.parametrize("strategy", ["lora", "dora", "ia3"])
def test_merged_export_gives_the_adapter_models_logits(strategy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = apply_adapter(tiny_llama(), strategy, PeftConfig(rank=4), Task.causal_lm)
    one_step(model)  # non-trivial adapter weights (LoRA's B starts at zero)
    model.eval()
    ids = torch.randint(5, 1000, (2, 10))
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
    export_adapted(model, strategy, PeftConfig(rank=4), str(tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapter_logits, rtol=1e-5, atol=1e-6)
