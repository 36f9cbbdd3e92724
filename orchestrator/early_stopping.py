"""The median stopping rule for sweep trials: at each evaluation, a trial whose validation metric is worse than
the median of the other trials' at the same step stops (Golovin et al., "Google Vizier", 2017).

Trials of a sweep are separate runs in sibling directories of one sweep directory, so they compare notes
through files: each writes <run_dir>/eval_history.json ({step: value}) after every evaluation, and reads its
siblings'. Only rank 0 decides; the decision is broadcast so that every rank leaves the loop together.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
from typing import Dict, Optional

from orchestrator.files import write_json_atomically

HISTORY_FILE = "eval_history.json"
MIN_PEERS = 2  # other trials that must have reached this step before a trial can be stopped


def record(run_dir: str, step: int, value: float) -> None:
    history = read_history(os.path.join(run_dir, HISTORY_FILE))
    history[step] = value
    write_json_atomically(os.path.join(run_dir, HISTORY_FILE), {str(k): v for k, v in history.items()})


def read_history(path: str) -> Dict[int, float]:
    try:
        with open(path, encoding="utf-8") as handle:
            return {int(k): float(v) for k, v in json.load(handle).items()}
    except (OSError, ValueError):
        return {}


def peers_at(run_dir: str, step: int) -> list:
    """The other trials' values at `step` (sibling run directories of the same sweep)."""
    own = os.path.abspath(run_dir)
    values = []
    for path in glob.glob(os.path.join(os.path.dirname(own), "*", HISTORY_FILE)):
        if os.path.dirname(os.path.abspath(path)) != own:
            value = read_history(path).get(step)
            if value is not None:
                values.append(value)
    return values


def should_stop(value: float, peers: list, mode: str) -> bool:
    """Worse than the median of at least MIN_PEERS other trials at the same step."""
    if len(peers) < MIN_PEERS:
        return False
    median = statistics.median(peers)
    return value > median if mode == "min" else value < median


def decide(run_dir: str, step: int, value: Optional[float], mode: str) -> bool:
    """Record this trial's value and say whether it falls behind (False when the metric is missing)."""
    if value is None:
        return False
    record(run_dir, step, value)
    return should_stop(value, peers_at(run_dir, step), mode)


def falls_behind(run_dir: str, step: int, value: Optional[float], mode: str, rank: int, device) -> bool:
    """The decision for all ranks: made on rank 0 (it alone writes and reads the files), then broadcast, so
    that every rank leaves the training loop at the same step."""
    import torch
    import torch.distributed as dist

    decision = torch.zeros(1, device=device)
    if rank == 0:
        decision[0] = float(decide(run_dir, step, value, mode))
    dist.broadcast(decision, src=0)
    return bool(decision.item())
