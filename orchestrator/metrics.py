"""Evaluation: a distributed pass over the validation rows and the metrics computed from it.

Every rank evaluates its share; predictions are gathered so that accuracy and macro-F1 are computed
once over the whole split (scikit-learn's implementations, not our own).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from orchestrator.config import Task
from orchestrator.data.batching import collate, shard_for_evaluation
from orchestrator.data.formats import IGNORE_INDEX, Example
from orchestrator.losses import loss_terms


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> Dict[str, float]:
    """Accuracy and macro-F1 (the mean of per-class F1: a majority-class predictor scores low on it)."""
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0))}


def confusion(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> List[List[int]]:
    """Confusion matrix as nested lists (JSON-able): row = true class, column = predicted class, in class-index
    order, every class present even when it never occurs (scikit-learn's confusion_matrix)."""
    return confusion_matrix(labels, predictions, labels=list(range(num_classes))).tolist()


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """ROUGE-L F1 (rouge-score, with stemming; mean over rows, 0..1) and corpus BLEU (sacrebleu's default
    13a tokenization and exp smoothing, 0..100) of generated answers against reference answers."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(reference, prediction)["rougeL"].fmeasure
             for prediction, reference in zip(predictions, references)]
    return {"rougeL": float(sum(rouge) / len(rouge)),
            "bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def generative_classification_metrics(predictions: Sequence[str], references: Sequence[str],
                                      labels: Sequence[str]) -> Dict[str, float]:
    """Accuracy and macro-F1 of a causal LM that answers with a class name: the generated text counts as the
    label it equals (case and surrounding whitespace/punctuation ignored), else as wrong ("unparsed")."""
    index = {_normalise(name): i for i, name in enumerate(labels)}
    golds = [index.get(_normalise(r), -1) for r in references]
    if -1 in golds:
        raise ValueError(f"reference {references[golds.index(-1)]!r} is not one of the labels {list(labels)}")
    guessed = [index.get(_normalise(p), -1) for p in predictions]
    metrics = {"accuracy": float(accuracy_score(golds, guessed)),
               # the mean over the real classes: an unparsed answer is a miss for its true class
               "macro_f1": float(f1_score(golds, guessed, labels=list(range(len(labels))), average="macro",
                                          zero_division=0)),
               "unparsed": float(sum(g == -1 for g in guessed) / max(1, len(guessed)))}
    return metrics


def _normalise(text: str) -> str:
    return str(text).strip().strip(".!:;,\"'").strip().lower()


def format_samples(prompts: Sequence[str], predictions: Sequence[str], references: Sequence[str],
                   count: int = 3, width: int = 300) -> str:
    """A few generated answers beside their references, for the log."""
    def clip(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[: width - 1] + "…"

    blocks = []
    for number, (prompt, prediction, reference) in enumerate(zip(prompts, predictions, references)):
        if number == count:
            break
        blocks.append(f"sample {number + 1}\n  prompt:    {clip(prompt)}\n  generated: {clip(prediction)}\n"
                      f"  reference: {clip(reference)}")
    return "\n".join(blocks)


@torch.no_grad()
def evaluate(model, examples: List[Example], task: Task, batch_size: int, pad_token_id: int,
             device: torch.device, with_confusion: bool = False) -> Dict[str, Any]:
    """Validation loss (and accuracy / macro-F1, or perplexity). with_confusion (classification): also
    "confusion_matrix", a list of lists (not a number: keep it out of per-step logging)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    was_training = model.training
    model.eval()
    share = shard_for_evaluation(len(examples), rank, world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, weight (on the device: NCCL)
    predictions: List[int] = []
    golds: List[int] = []
    num_classes: Optional[int] = None
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
            num_classes = logits.shape[-1]
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
        if with_confusion and num_classes is not None:
            metrics["confusion_matrix"] = confusion(predictions, golds, num_classes)
    else:
        metrics["perplexity"] = math.exp(min(loss, 50.0))
    return metrics


def validation_metrics(model, data, task: Task, batch_size: int, pad_token_id: int, device: torch.device,
                       with_confusion: bool = False) -> Dict[str, Any]:
    """Metrics on the validation split (`data`: an EncodedData); for a data.mix of several datasets also each
    dataset's own, as <name>/loss etc."""
    metrics = evaluate(model, data.validation, task, batch_size, pad_token_id, device, with_confusion=with_confusion)
    if len(data.parts) > 1:
        for part in data.parts:
            metrics.update(prefixed(part.name, evaluate(model, part.validation, task, batch_size, pad_token_id,
                                                        device)))
    return metrics


def forgetting_metrics(model, data, task: Task, batch_size: int, pad_token_id: int, device: torch.device,
                       when: str) -> Dict[str, float]:
    """data.reference_path: loss and perplexity on general text, "before" or "after" fine-tuning (a rise
    after means the model forgot some of its general language modelling)."""
    if not data.reference:
        return {}
    metrics = evaluate(model, data.reference, task, batch_size, pad_token_id, device)
    return {f"forgetting/loss_{when}": metrics["loss"], f"forgetting/perplexity_{when}": metrics["perplexity"]}


def prefixed(prefix: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}
