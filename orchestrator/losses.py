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
    loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, weight


def class_weights_for(counts: torch.Tensor, scheme: str) -> Optional[torch.Tensor]:
    """Per-class loss weights from training label counts ("balanced": n / (k * n_c), as scikit-learn)."""
    if scheme == "none":
        return None
    balanced = counts.sum() / (len(counts) * counts.clamp(min=1).double())
    return (balanced.sqrt() if scheme == "sqrt_balanced" else balanced).float()
