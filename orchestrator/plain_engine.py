"""A single-process stand-in for the few DeepSpeed engine calls the training loop makes.

Used when the plan has nothing to partition (one worker training adapters, e.g. LoRA/QLoRA on one GPU):
there DeepSpeed would only add overhead, and it does not handle bitsandbytes' 4-bit weights. The loop
stays the same: engine(**batch), engine.backward(loss), engine.step(), save/load_checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn


class PlainEngine:
    def __init__(self, module: nn.Module, optimizer, scheduler, grad_accum: int, grad_clip: float,
                 autocast_dtype: Optional[torch.dtype], device: torch.device):
        self.module = module.to(device) if not _is_quantized(module) else module
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.autocast_dtype, self.device = autocast_dtype, device
        self.global_rank = 0
        self.micro_steps = 0
        self.checkpoint_engine = TorchFiles()  # as DeepSpeed's engine: what writes its files (checkpoint_writer.py)

    def __call__(self, **batch):
        context = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                   else contextlib.nullcontext())
        with context:
            return self.module(**batch)

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()  # as DeepSpeed: the loss of one micro-batch of `grad_accum`

    def step(self) -> None:
        """Optimizer step at the end of each accumulation window, like DeepSpeed's engine.step()."""
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def trainable_state(self) -> dict:
        return {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        self.checkpoint_engine.save({"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                                     "scheduler": self.scheduler.state_dict(), "client_state": client_state},
                                    os.path.join(directory, tag, "state.pt"))

    def load_checkpoint(self, directory: str, tag: str):
        # our own file, written by save_checkpoint: tensors, dicts and numbers only
        state = torch.load(os.path.join(directory, tag, "state.pt"), map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return directory, state["client_state"]


class TorchFiles:
    """Writes a checkpoint file, as DeepSpeed's TorchCheckpointEngine does: a background checkpoint stands in for it
    while it takes the state (checkpoint_writer.Staging) and writes through it later."""

    def save(self, state_dict, path: str) -> None:
        torch.save(state_dict, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)


def _is_quantized(module: nn.Module) -> bool:
    return bool(getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_quantized", False))
