"""Evaluation: a distributed pass over the validation rows and the metrics computed from it.

Every rank evaluates its share; predictions are gathered so that accuracy and macro-F1 are computed
once over the whole split (scikit-learn's implementations, not our own).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, f1_score

from orchestrator.config import Task
from orchestrator.data.batching import collate, shard_for_evaluation
from orchestrator.data.formats import IGNORE_INDEX, Example
from orchestrator.losses import loss_terms


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> Dict[str, float]:
    """Accuracy and macro-F1 (the mean of per-class F1: a majority-class predictor scores low on it)."""
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0))}


@torch.no_grad()
def evaluate(model, examples: List[Example], task: Task, batch_size: int, pad_token_id: int,
             device: torch.device) -> Dict[str, float]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    was_training = model.training
    model.eval()
    share = shard_for_evaluation(len(examples), rank, world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, weight (on the device: NCCL)
    predictions: List[int] = []
    golds: List[int] = []
    for start in range(0, len(share), batch_size):
        indices = share[start: start + batch_size]
        valid = torch.tensor([i is not None for i in indices])
        batch = collate([examples[i if i is not None else 0] for i in indices], pad_token_id)
        labels = batch.pop("labels")
        if task is Task.classification:
            labels = labels[valid]
        else:
            labels[~valid] = IGNORE_INDEX  # padding rows (repeats of row 0) count for nothing
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        if task is Task.classification:
            logits = logits[valid.to(device)]
            predictions += logits.argmax(-1).tolist()
            golds += labels.tolist()
        loss_sum, weight = loss_terms(logits, labels.to(device), task)
        totals[0] += loss_sum.double()
        totals[1] += weight
    if world_size > 1:
        dist.all_reduce(totals)
        gathered: List = [None] * world_size
        dist.all_gather_object(gathered, (predictions, golds))
        predictions = [p for part in gathered for p in part[0]]
        golds = [g for part in gathered for g in part[1]]
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    metrics = {"loss": loss}
    if task is Task.classification:
        metrics.update(classification_metrics(predictions, golds))
    else:
        metrics["perplexity"] = math.exp(min(loss, 50.0))
    return metrics
