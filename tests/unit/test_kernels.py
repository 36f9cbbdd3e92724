"""The fused-kernel switch (orchestrator/kernels.py): the planner's decision, and the fused-loss wiring.

Liger's Triton kernels need a GPU; here a stand-in with Liger's call signature computes the same sum with
plain PyTorch, so what is tested is our part: the head keeps the weight (tied embeddings stay tied), the
forward with labels shifts like losses.loss_terms and skips IGNORE_INDEX, and the gradients match the
unfused path. The real kernel's loss is compared with the plain one on a GPU by bench/throughput.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from orchestrator import kernels
from orchestrator.config import FusedKernels, ModelConfig, Task
from orchestrator.errors import UserError
from orchestrator.losses import loss_terms

LLAMA = {"model_type": "llama"}


def test_auto_is_off_without_a_gpu_and_says_why(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    use, why = kernels.decide(ModelConfig(task=Task.causal_lm), LLAMA, use_gpu=False)
    assert not use and "GPU" in why


def test_auto_is_on_for_a_supported_model_on_gpu(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    use, why = kernels.decide(ModelConfig(task=Task.causal_lm), LLAMA, use_gpu=True)
    assert use and "loss" in why
    use, why = kernels.decide(ModelConfig(task=Task.causal_lm), {"model_type": "bert"}, use_gpu=True)
    assert not use and "bert" in why


def test_on_fails_at_once_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    with pytest.raises(UserError, match="model.fused_kernels=on.*liger-kernel is not installed"):
        kernels.decide(ModelConfig(fused_kernels=FusedKernels.on), LLAMA, use_gpu=True)
    assert kernels.decide(ModelConfig(fused_kernels=FusedKernels.off), LLAMA, use_gpu=True) == (
        False, "model.fused_kernels=off")


class _ReferenceFusedLoss:
    """Liger's LigerFusedLinearCrossEntropyLoss interface, computed the plain way."""

    def __init__(self, ignore_index: int, reduction: str):
        self.ignore_index, self.reduction = ignore_index, reduction

    def __call__(self, weight, hidden, target, bias=None):
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)


@pytest.fixture
def reference_liger(monkeypatch):
    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = _ReferenceFusedLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_equals_the_plain_loss_and_gradients(reference_liger, tied):
    plain, fused = tiny_llama(tied), tiny_llama(tied)
    kernels.attach_fused_loss(fused)
    assert set(fused.state_dict()) == set(plain.state_dict())  # checkpoints and exports are unchanged
    if tied:
        assert fused.lm_head.weight is fused.model.embed_tokens.weight
    input_ids = torch.randint(0, 97, (2, 11))
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt, as alpaca rows have
    labels[1, 9:] = -100  # padding

    expected, _ = loss_terms(plain(input_ids=input_ids).logits, labels, Task.causal_lm)
    got = fused(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.backward()
    got.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # without labels: the model's own forward, logits as before (evaluation, generation)
    torch.testing.assert_close(fused(input_ids=input_ids).logits, plain(input_ids=input_ids).logits)


@pytest.mark.parametrize("strategy", ["prompt", "prefix"])
def test_fused_loss_of_a_prompt_learning_model_equals_ours(reference_liger, strategy):
    """peft's prompt tuning gives the fused forward its virtual tokens' positions and IGNORE_INDEX labels for
    them (PeftModelForCausalLM.forward); prefix tuning none. With kernels.fused_targets the fused sum is
    loss_terms' (which drops the virtual positions) also where labels[:, 0] is a target (text rows)."""
    from orchestrator.adapters import apply_adapter
    from orchestrator.config import PeftConfig

    plain, fused = tiny_llama(False), tiny_llama(False)
    kernels.attach_fused_loss(fused)
    plain = apply_adapter(plain, strategy, PeftConfig(virtual_tokens=6), Task.causal_lm)
    fused = apply_adapter(fused, strategy, PeftConfig(virtual_tokens=6), Task.causal_lm)
    fused.load_state_dict(plain.state_dict())
    input_ids = torch.randint(0, 97, (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    text = input_ids.masked_fill(attention_mask == 0, -100)  # every real token a target, the first one too
    prompted = text.clone()
    prompted[:, :4] = -100
    for labels in (prompted, text):
        expected, _ = loss_terms(plain(input_ids=input_ids, attention_mask=attention_mask).logits, labels,
                                 Task.causal_lm)
        got = fused(input_ids=input_ids, attention_mask=attention_mask, labels=kernels.fused_targets(labels))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.fused_targets(prompted), prompted)
    assert torch.equal(kernels.fused_targets(text)[:, 1:], text[:, 1:])
    unmasked = fused(input_ids=input_ids, attention_mask=attention_mask, labels=text)
    assert (strategy == "prompt") == (not torch.allclose(unmasked, expected)), "the first token's extra term"
