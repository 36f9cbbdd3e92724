"""Where a run's time and GPU memory went: seconds per phase, peak memory over the ranks."""

from __future__ import annotations

import contextlib
import time
from typing import Dict

import torch
import torch.distributed as dist


class PhaseTimer:
    """Seconds spent per phase (train steps, evaluation), reported as time/<phase>_s."""

    def __init__(self):
        self.total: Dict[str, float] = {}
        self.open: Dict[str, float] = {}

    def start(self, phase: str) -> None:
        self.open[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        self.total[phase] = self.total.get(phase, 0.0) + time.perf_counter() - self.open.pop(phase)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.start(phase)
        yield
        self.stop(phase)

    def seconds(self) -> Dict[str, float]:
        return {f"time/{phase}_s": value for phase, value in self.total.items()}


def peak_gpu_memory(device: torch.device) -> Dict[str, float]:
    """Peak allocated and reserved GPU memory over the run, the largest of any rank (GiB)."""
    if device.type != "cuda":
        return {}
    peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                         dtype=torch.float64, device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return {"gpu/max_allocated_gib": peaks[0].item() / 2**30, "gpu/max_reserved_gib": peaks[1].item() / 2**30}
