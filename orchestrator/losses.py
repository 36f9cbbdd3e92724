"""Losses as (sum, weight) pairs, so that the global batch's loss is one sum over one normaliser.

Summing per-row (or per-token) losses and dividing by the global batch's total weight gives the same
gradient however the global batch is split over workers and accumulation steps; a mean per micro-batch
would weight a short micro-batch's tokens more than a long one's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from orchestrator.config import Task
from orchestrator.data.formats import IGNORE_INDEX


def target_weight(labels: torch.Tensor, task: Task, class_weights: Optional[torch.Tensor] = None) -> float:
    """The batch's share of the loss normaliser: its rows' class weights, or its counted target tokens."""
    if task is Task.classification:
        return float(class_weights[labels.cpu()].sum()) if class_weights is not None else float(len(labels))
    return float((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_terms(logits: torch.Tensor, labels: torch.Tensor, task: Task,
               class_weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, float]:
    """(sum of per-row or per-token losses, weighted as in training; their total weight)."""
    weight = target_weight(labels, task, class_weights)
    if task is Task.classification:
        per_row = F.cross_entropy(logits.float(), labels, reduction="none")
        if class_weights is not None:
            per_row = per_row * class_weights.to(logits.device)[labels]
        return per_row.sum(), weight
    # causal LM: position t predicts token t+1; prompt and padding carry IGNORE_INDEX
    logits = input_positions(logits, labels)
    loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, weight


def input_positions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits at the input's own positions (those the labels are aligned with).

    peft's prompt tuning (and p-tuning) prepends its num_virtual_tokens trained embeddings to the input
    embeddings, so the model's logits begin with that many positions that have no label; prefix tuning puts
    its virtual tokens in the past key values instead, and its logits are the input's length. Here the first
    logits.shape[1] - labels.shape[1] positions, the virtual tokens', are dropped: what peft's
    PeftModelForCausalLM.forward does by prepending num_virtual_tokens IGNORE_INDEX labels, except that the
    last virtual position's prediction of the input's first token is not counted, which peft counts where
    labels[:, 0] is a target: by our convention targets[0] never trains (formats.add_example; target_weight
    counts labels[:, 1:]), so the loss and its normaliser stay those of every other strategy. Instruction
    and chat rows start with IGNORE_INDEX, so there the loss is exactly peft's."""
    extra = logits.shape[1] - labels.shape[1]
    if extra < 0:
        raise ValueError(f"{logits.shape[1]} logit positions for {labels.shape[1]} labels")
    return logits[:, extra:] if extra else logits


def class_weights_for(counts: torch.Tensor, scheme: str) -> Optional[torch.Tensor]:
    """Per-class loss weights from training label counts ("balanced": n / (k * n_c), as scikit-learn)."""
    if scheme == "none":
        return None
    balanced = counts.sum() / (len(counts) * counts.clamp(min=1).double())
    return (balanced.sqrt() if scheme == "sqrt_balanced" else balanced).float()
