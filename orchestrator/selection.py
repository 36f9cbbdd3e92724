"""Model selection: keep the weights of the best validation evaluation, export those, stop when it stops improving.

The run evaluates on validation every trainer.eval_every steps (default: once per epoch). Each rank keeps, in
host memory, a copy of its own part of the trainable weights from the best evaluation so far: under ZeRO-3 its
partition of every parameter (1/N of the model per rank: 2 GB per rank for an 8B bf16 model on 8 GPUs), for
adapters only the adapter weights. At the end those are put back before the final evaluation and the export, so
the exported model is the one validation chose, not merely the last one. No extra checkpoint is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

# metrics where lower is better; every other metric (accuracy, macro_f1, rougeL, bleu, ...) is better higher
LOWER_IS_BETTER = ("loss", "perplexity")


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return name in LOWER_IS_BETTER or name.endswith("_loss") or name.startswith("loss")


@dataclass
class Selection:
    """What the checkpoints carry of the selection (TrainState.notes): the best so far and how long ago."""

    metric: str  # e.g. "macro_f1": eval/<metric>
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    evaluations_since_best: int = 0
    history: List[List[float]] = field(default_factory=list)  # [step, value] of every finite evaluation (plots)

    def improves(self, value: Optional[float], ties_win: bool = False) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None or (ties_win and value == self.best_value):
            return True
        return value < self.best_value if lower_is_better(self.metric) else value > self.best_value

    def to_notes(self) -> Dict[str, Any]:
        return {"select/metric": self.metric, "select/best_value": self.best_value, "select/best_step": self.best_step,
                "select/evaluations_since_best": self.evaluations_since_best, "select/history": list(self.history)}

    @classmethod
    def from_notes(cls, notes: Dict[str, Any], metric: str) -> "Selection":
        """The selection a checkpoint carried (if it selected by the same metric), else a fresh one."""
        if notes.get("select/metric") != metric:
            return cls(metric)
        return cls(metric, notes.get("select/best_value"), notes.get("select/best_step"),
                   notes.get("select/evaluations_since_best", 0), [list(p) for p in notes.get("select/history", [])])

    def observe(self, step: int, value: Optional[float], ties_win: bool = False) -> bool:
        """Record an evaluation; True when it is the new best (with ties_win, also when it equals the best: the
        final weights, trained longer, win a tie)."""
        if value is not None and math.isfinite(value) and [step, value] not in self.history:
            self.history.append([step, value])
        if self.improves(value, ties_win):
            self.best_value, self.best_step, self.evaluations_since_best = value, step, 0
            return True
        self.evaluations_since_best += 1
        return False


class WeightSnapshot:
    """This rank's part of the trainable weights, copied to host memory (ZeRO-3: each parameter's local
    partition, ds_tensor; otherwise the parameter itself)."""

    def __init__(self, engine):
        self.engine = engine
        self.parameters = [p for p in engine.module.parameters() if p.requires_grad]
        self.saved: Optional[List[torch.Tensor]] = None

    @staticmethod
    def _local(parameter: torch.Tensor) -> torch.Tensor:
        return parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter.data

    def take(self) -> None:
        self.saved = [self._local(p).detach().to("cpu", copy=True) for p in self.parameters]

    def put_back(self) -> bool:
        if self.saved is None:
            return False
        # ZeRO-3 keeps parameters below stage3_param_persistence_threshold whole on every rank (AVAILABLE), rebuilt
        # from their partitions after each optimizer step: release them, restore every partition, gather them again
        # (all_gather skips parameters that are AVAILABLE), as DeepSpeed does itself after loading a checkpoint
        persistent = getattr(getattr(self.engine, "optimizer", None), "persistent_parameters", None)
        if persistent:
            persistent[0].partition(persistent)
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, self.saved):
                self._local(parameter).copy_(saved)
        if persistent:
            persistent[0].all_gather(persistent)
        return True
