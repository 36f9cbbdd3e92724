"""Experiment tracking (W&B) and what rank 0 shows on the driver's console (progress, notes; orchestrator/progress.py
draws them). Rank 0 only; other ranks get no-ops.

Secrets stay in the environment: W&B reads WANDB_API_KEY itself; the config we log holds none.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from orchestrator.config import LoggerConfig, LoggerMode
from orchestrator.progress import ProgressSender


def wandb_mode(cfg: LoggerConfig) -> str:
    """online needs a key: without one, log offline (sync later with `wandb sync`) instead of failing."""
    if cfg.mode is LoggerMode.online and not os.environ.get("WANDB_API_KEY"):
        return "offline"
    return cfg.mode.value


class Tracker:
    def __init__(self, cfg: LoggerConfig, enabled: bool, run_name: str, run_dir: str, total_steps: int,
                 config: Dict[str, Any], sender: Optional[ProgressSender] = None, steps_per_epoch: int = 0,
                 rows_per_step: int = 0):
        """sender: where the console's lines go (orchestrator/progress.py: the driver draws them); without one,
        this process's stdout. rows_per_step: a classifier's global batch (its progress shows rows/s)."""
        self.enabled = enabled
        self.wandb_run = None
        self.total_steps, self.steps_per_epoch, self.rows_per_step = total_steps, steps_per_epoch, rows_per_step
        self.progress = cfg.progress
        self.sender = sender or ProgressSender(None)
        if not enabled:
            return
        if wandb_mode(cfg) != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, name=run_name,
                                        dir=run_dir, mode=wandb_mode(cfg), config=config)

    def start(self, step: int) -> None:
        """Training begins (after the evaluation before it) at `step`: the progress counts from here."""
        if self.enabled and self.progress:
            self.sender.send("start", total=self.total_steps, step=step, steps_per_epoch=self.steps_per_epoch,
                             rows_per_step=self.rows_per_step)

    def log(self, step: int, metrics: Dict[str, float], step_s: float = float("nan")) -> None:
        if not self.enabled:
            return
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if "train/loss" in metrics and self.progress:
            self.sender.send("step", step=step, loss=metrics["train/loss"], lr=metrics["train/lr"],
                             tokens_per_s=metrics["train/tokens_per_s"], step_s=step_s)

    def note(self, line: str) -> None:
        """One line on the console (rank 0), e.g. where a resumed run continues."""
        if self.enabled:
            self.sender.send("note", text=line)

    def warn(self, line: str) -> None:
        """A warning on the console (rank 0): something went wrong that the run survives."""
        if self.enabled:
            self.sender.send("warning", text=line)

    def late_metrics(self, metrics: Dict[str, Any]) -> None:
        """Metrics measured after the final checkpoint (optional evaluations): to the driver's metrics.json."""
        if self.enabled and metrics:
            self.sender.send("metrics", metrics=metrics)

    def finish(self, summary: Optional[Dict[str, float]] = None) -> None:
        if not self.enabled:
            return
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary or {})
            self.wandb_run.finish()
