"""Fused GPU kernels from Liger Kernel (Triton), for the Llama, Mistral and Qwen families.

Two parts, both on by default on a GPU (model.fused_kernels=auto) where liger-kernel is installed:
  - patch_model_classes: before the model is built, transformers' RMSNorm, gated MLP (SwiGLU) and rotary
    embedding of that family are swapped for Liger's fused versions (same parameters and state-dict names,
    so checkpoints and exports are unchanged);
  - attach_fused_loss (causal LM): the output projection and the cross-entropy run as one chunked kernel,
    so the [tokens x vocabulary] logits (12 bytes per token and vocabulary entry with their fp32 copy and
    gradient: 6 GiB for 4096 tokens of Llama 3) never exist. The model keeps its own forward for evaluation
    and generation; only a forward given `labels` takes the fused path and returns the summed loss.

The fused loss runs inside the lm_head module's forward, so DeepSpeed ZeRO-3's hooks gather the head's
weight for it and route its gradient as for any layer (reading the weight from outside would see an empty
shard). Liger computes the head's gradients in the forward pass, chunk by chunk.
"""

from __future__ import annotations

import importlib.util
import types
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import FusedKernels, ModelConfig, Task
from orchestrator.data.formats import IGNORE_INDEX
from orchestrator.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # plain RMSNorm + SwiGLU + RoPE, no logit softcap


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def fuses_loss(fused_kernels: bool, task: Task) -> bool:
    """The loss is fused into the output head for causal LM only (a classifier's logits are tiny)."""
    return fused_kernels and task is Task.causal_lm


def decide(cfg: ModelConfig, model_config: dict, use_gpu: bool) -> Tuple[bool, str]:
    """(use the fused kernels?, why): the planner's decision, printed with the plan."""
    model_type = model_config.get("model_type", "?")
    blockers = []
    if not use_gpu:
        blockers.append("they need a GPU (Triton)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        blockers.append(f"model_type {model_type} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    if not liger_installed():
        blockers.append("liger-kernel is not installed (pip install 'orchestrator[gpu]')")
    if cfg.fused_kernels is FusedKernels.off:
        return False, "model.fused_kernels=off"
    if blockers:
        if cfg.fused_kernels is FusedKernels.on:
            raise UserError(f"model.fused_kernels=on cannot be met: {'; '.join(blockers)} "
                            "(use model.fused_kernels=auto or off)")
        return False, "; ".join(blockers)
    what = "RMSNorm, SwiGLU, RoPE" + (", output projection + loss" if fuses_loss(True, cfg.task) else "")
    return True, f"Liger Kernel: {what}"


def patch_model_classes(model_type: str) -> None:
    """Swap this family's norm, MLP and rotary embedding for Liger's, before the model is built (the
    patch is process-wide: each Ray worker is its own process)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                             fused_linear_cross_entropy=False)


class FusedLinearCrossEntropyHead(nn.Module):
    """Stands in for lm_head, holding the very same weight (tied embeddings stay tied, the state-dict key
    stays lm_head.weight). Without targets it is the plain linear map; with targets it returns the sum of
    the token losses (IGNORE_INDEX skipped) straight from the hidden states."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.in_features, self.out_features = head.in_features, head.out_features

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        return loss(self.weight, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), self.bias)


def fused_targets(labels: torch.Tensor) -> torch.Tensor:
    """The labels to give a model with the fused loss: labels[:, 0] set to IGNORE_INDEX. The first token never
    trains (nothing before it predicts it; losses.target_weight counts labels[:, 1:]), and the fused forward,
    shifting by one, would not count it anyway, except under peft's prompt tuning: PeftModelForCausalLM.forward
    prepends num_virtual_tokens IGNORE_INDEX labels for its virtual tokens, and the last virtual position would
    then predict labels[:, 0], a loss term that losses.loss_terms leaves out and the normaliser does not count."""
    labels = labels.clone()  # always: a test of labels[:, 0] would wait for the GPU
    labels[:, 0] = IGNORE_INDEX
    return labels


def attach_fused_loss(model: nn.Module) -> None:
    """Causal LM: replace the output head by FusedLinearCrossEntropyHead and give this model instance a
    forward that, when called with labels, returns the summed next-token loss (position t predicts t+1,
    as losses.loss_terms) without logits. Called before adapters and deepspeed.initialize."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise UserError(f"model.fused_kernels: {type(model).__name__}'s output head is not a linear layer "
                        "(use model.fused_kernels=off)")
    model.set_output_embeddings(FusedLinearCrossEntropyHead(head))
    plain_forward = model.forward

    def forward(self, *args, labels: Optional[torch.Tensor] = None, **kwargs):
        if labels is None:
            return plain_forward(*args, **kwargs)
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        return self.get_output_embeddings()(hidden[:, :-1], labels[:, 1:])

    model.forward = types.MethodType(forward, model)
