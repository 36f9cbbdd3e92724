"""Checkpoint completeness, choosing one to resume from, and RNG state round trips (no Ray needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import (
    checkpoint_info,
    newest_complete_checkpoint,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from orchestrator.errors import UserError


def fake_checkpoint(root, name: str, step: int, world_size: int = 2, ranks=None):
    """What two ranks leave after save_and_report: a shard each, and a marker listing its files."""
    path = root / name
    for rank in ranks if ranks is not None else range(world_size):
        shard = path / "deepspeed" / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(b"x" * (100 + rank))
        (path / "complete").mkdir(exist_ok=True)
        (path / "complete" / f"rank_{rank}.json").write_text(json.dumps({
            "step": step, "world_size": world_size, "rank": rank,
            "files": {str(shard.relative_to(path)): shard.stat().st_size}}))
    return path


def test_a_checkpoint_is_complete_only_with_every_rank_and_every_file(tmp_path):
    assert checkpoint_info(str(fake_checkpoint(tmp_path, "checkpoint_a", 5))).step == 5
    assert checkpoint_info(str(fake_checkpoint(tmp_path, "checkpoint_b", 5, ranks=[0]))) is None
    cut = fake_checkpoint(tmp_path, "checkpoint_c", 5)
    (cut / "deepspeed" / "zero" / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert checkpoint_info(str(cut)) is None
    assert checkpoint_info(str(tmp_path / "nothing")) is None


def test_resume_auto_takes_the_highest_complete_step_and_warns_about_the_rest(tmp_path):
    runs = tmp_path / "runs" / "legal"
    fake_checkpoint(runs / "first" / "checkpoints" / "legal", "checkpoint_1", 5)
    fake_checkpoint(runs / "first" / "checkpoints" / "legal", "checkpoint_2", 10)
    fake_checkpoint(runs / "first" / "checkpoints" / "legal", "checkpoint_3", 15, ranks=[1])
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint_3"):
        info = resolve_resume("auto", str(runs / "second"), str(runs / "second" / "checkpoints"))
    assert info.step == 10 and info.path.endswith("checkpoint_2")
    assert resolve_resume(None, str(runs / "second"), "") is None
    assert newest_complete_checkpoint([str(tmp_path / "empty")]) is None


def test_resume_from_a_bad_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path), str(tmp_path))
    partial = fake_checkpoint(tmp_path, "checkpoint_x", 5, ranks=[0])
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_resume(str(partial), str(tmp_path), str(tmp_path))


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    actual = (random.random(), np.random.rand(), torch.rand(3))
    assert actual[:2] == expected[:2] and torch.equal(actual[2], expected[2])


def test_a_metrics_only_report_is_never_resumed_from(tmp_path):
    """trainer.save_final=false leaves a checkpoint that holds only metrics: resume=auto passes over it."""
    import json as _json

    from orchestrator.checkpoint import METRICS_ONLY, newest_complete_checkpoint

    metrics_only = tmp_path / "run" / "checkpoint_2"
    metrics_only.mkdir(parents=True)
    (metrics_only / METRICS_ONLY).write_text(_json.dumps({"step": 2}))
    assert newest_complete_checkpoint([str(tmp_path)]) is None
