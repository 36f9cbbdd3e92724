"""Experiment tracking (W&B) and the console progress bar. Rank 0 only; other ranks get no-ops.

Secrets stay in the environment: W&B reads WANDB_API_KEY itself; the config we log holds none.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Optional

from orchestrator.config import LoggerConfig, LoggerMode


def wandb_mode(cfg: LoggerConfig) -> str:
    """online needs a key: without one, log offline (sync later with `wandb sync`) instead of failing."""
    if cfg.mode is LoggerMode.online and not os.environ.get("WANDB_API_KEY"):
        return "offline"
    return cfg.mode.value


class Tracker:
    def __init__(self, cfg: LoggerConfig, enabled: bool, run_name: str, run_dir: str, total_steps: int,
                 config: Dict[str, Any], bar: bool = True):
        """bar=False (the driver's console is not a terminal, e.g. CI): a plain line every ~10% instead."""
        self.enabled = enabled
        self.wandb_run = None
        self.bar = None
        self.total_steps = total_steps
        self.line_every = max(1, total_steps // 10) if cfg.progress and not bar else 0
        self.started = time.perf_counter()
        if not enabled:
            return
        if wandb_mode(cfg) != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, name=run_name,
                                        dir=run_dir, mode=wandb_mode(cfg), config=config)
        if cfg.progress and bar:
            from ray.experimental.tqdm_ray import tqdm  # renders on the driver's console

            self.bar = tqdm(total=total_steps, desc="train")

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if "train/loss" not in metrics:
            return
        status = (f"loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
                  f"{metrics['train/tokens_per_s']:.0f} tok/s")
        if self.bar is not None:
            self.bar.set_description(f"train {status}")
            self.bar.update(1)
        elif self.line_every and (step % self.line_every == 0 or step == self.total_steps):
            elapsed = time.perf_counter() - self.started
            # not print(): Ray Train turns a worker's print into an INFO log record, which we filter out
            sys.stdout.write(f"step {step}/{self.total_steps} {status} elapsed {elapsed:.0f}s\n")
            sys.stdout.flush()

    def note(self, line: str) -> None:
        """One line on the console (rank 0), e.g. where a resumed run continues."""
        if self.enabled:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def finish(self, summary: Optional[Dict[str, float]] = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary or {})
            self.wandb_run.finish()
