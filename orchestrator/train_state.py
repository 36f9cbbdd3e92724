"""The step state of a run, which travels inside every checkpoint beside the engine's shards.

It is the run's memory: where it stands, what each step measured, and what happened on the way (restarts,
evaluations before training). Its flat form (`to_history`) is what checkpoints, metrics.json and the plots
have always read: "train/loss_history" and so on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

HISTORIES = ("loss", "lr", "step_s", "tokens")  # one value per optimizer step, as train/<name>_history


@dataclass
class StepMetrics:
    """What one optimizer step measured."""

    loss: float  # over the whole global batch
    lr: float  # the rate this step trained with
    tokens: float  # non-padding tokens of the global batch
    seconds: float

    def as_metrics(self) -> Dict[str, float]:
        return {"train/loss": self.loss, "train/lr": self.lr, "train/tokens_per_s": self.tokens / self.seconds}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    loss: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    step_s: List[float] = field(default_factory=list)  # with tokens: throughput after warm-up (bench/)
    tokens: List[float] = field(default_factory=list)
    restarts: int = 0  # worker failures this run survived
    repeated_steps: int = 0  # steps trained again after those restarts
    # everything else a run carries along: eval_before/*, forgetting/*_before, time/first_step_at,
    # train/stopped_early_at
    notes: Dict[str, Any] = field(default_factory=dict)

    def record(self, step: StepMetrics) -> None:
        self.step += 1
        self.loss.append(step.loss)
        self.lr.append(step.lr)
        self.step_s.append(step.seconds)
        self.tokens.append(step.tokens)

    def count_restart(self, steps_done_before: int) -> None:
        """A worker failed: the run continues at self.step, repeating the steps done since."""
        self.restarts += 1
        self.repeated_steps += steps_done_before - self.step

    def to_history(self) -> Dict[str, Any]:
        history: Dict[str, Any] = {f"train/{name}_history": getattr(self, name) for name in HISTORIES}
        if self.restarts:
            history.update({"train/restarts": self.restarts, "train/repeated_steps": self.repeated_steps})
        return {**history, **self.notes}

    @classmethod
    def from_history(cls, step: int, history: Dict[str, Any]) -> "TrainState":
        history = dict(history)
        lists = {name: list(history.pop(f"train/{name}_history", [])) for name in HISTORIES}
        return cls(step=step, restarts=history.pop("train/restarts", 0),
                   repeated_steps=history.pop("train/repeated_steps", 0), notes=history, **lists)
