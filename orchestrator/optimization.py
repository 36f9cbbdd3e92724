"""The optimizer and the learning-rate schedule of a run, built from the config."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from orchestrator.config import RunConfig


def make_optimizer(model: torch.nn.Module, run: RunConfig, device: torch.device,
                   paged: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: fused on GPU; paged (bitsandbytes) for QLoRA, whose optimizer
    state pages out to host memory under pressure instead of failing."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=run.optim.lr, betas=tuple(run.optim.betas), eps=run.optim.eps,
                  weight_decay=run.optim.weight_decay)
    if paged:
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW(trainable, **kwargs)
    return torch.optim.AdamW(trainable, fused=device.type == "cuda", **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, run: RunConfig, total_steps: Optional[int] = None):
    """Linear warmup from 0, then cosine/linear decay (or constant) over the run's `total_steps` optimizer
    steps (default trainer.max_steps)."""
    from transformers import get_scheduler

    shape = schedule_of(run, total_steps or run.trainer.max_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[shape["schedule"]]
    return get_scheduler(name, optimizer, num_warmup_steps=shape["warmup_steps"],
                         num_training_steps=shape["total_steps"])


def schedule_of(run: RunConfig, total_steps: int) -> Dict[str, Any]:
    """The learning-rate schedule as plain data: what make_scheduler builds, and what a checkpoint's markers record
    so that the driver can tell whether a resumed run asks for the same one (checkpoint.check_resume_matches)."""
    return {"schedule": run.optim.schedule.value, "lr": run.optim.lr,
            "warmup_steps": int(run.optim.warmup_ratio * total_steps), "total_steps": total_steps}
