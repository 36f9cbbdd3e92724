"""Checkpoint completeness, choosing one to resume from, and RNG state round trips (no Ray needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import (
    CHECKSUM,
    checkpoint_info,
    file_checksum,
    newest_complete_checkpoint,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from orchestrator.errors import UserError


def fake_checkpoint(root, name: str, step: int, world_size: int = 2, ranks=None, checksums: bool = True):
    """What two ranks leave after save_and_report: a shard each, and a marker listing its files with their sizes
    and (unless checksums=False, as markers written before they existed) their checksums."""
    path = root / name
    for rank in ranks if ranks is not None else range(world_size):
        shard = path / "deepspeed" / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(bytes(range(256)) * 8 + b"x" * rank)
        name_in_checkpoint = str(shard.relative_to(path))
        marker = {"step": step, "world_size": world_size, "rank": rank,
                  "files": {name_in_checkpoint: shard.stat().st_size}}
        if checksums:
            marker[CHECKSUM] = {name_in_checkpoint: file_checksum(str(shard))}
        (path / "complete").mkdir(exist_ok=True)
        (path / "complete" / f"rank_{rank}.json").write_text(json.dumps(marker))
    return path


def overwrite(path, rank: int = 1):
    """Same size, other bytes: what a bad disk, a botched copy or a stray write leaves."""
    shard = path / "deepspeed" / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[1000:1004] = b"\xde\xad\xbe\xef"
    shard.write_bytes(bytes(data))
    return shard


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


def test_a_checkpoint_whose_bytes_changed_is_not_complete(tmp_path):
    intact = fake_checkpoint(tmp_path, "checkpoint_a", 5)
    assert checkpoint_info(str(intact)).step == 5
    size = overwrite(intact).stat().st_size
    assert checkpoint_info(str(intact)) is None
    assert size == (tmp_path / "checkpoint_a" / "deepspeed" / "zero" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
                    ).stat().st_size  # the sizes alone would have passed it


def test_a_marker_without_checksums_still_counts_by_sizes(tmp_path):
    """Runs saved before markers carried checksums still resume; their sizes are checked as before."""
    old = fake_checkpoint(tmp_path, "checkpoint_old", 5, checksums=False)
    assert checkpoint_info(str(old)).step == 5
    overwrite(old)
    assert checkpoint_info(str(old)).step == 5  # nothing to tell it by
    (old / "deepspeed" / "zero" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert checkpoint_info(str(old)) is None


def test_resume_auto_skips_a_corrupted_newest_checkpoint_for_the_previous_one(tmp_path):
    runs = tmp_path / "runs" / "legal"
    storage = runs / "first" / "checkpoints" / "legal"
    fake_checkpoint(storage, "checkpoint_1", 5)
    fake_checkpoint(storage, "checkpoint_2", 10)
    shard = overwrite(fake_checkpoint(storage, "checkpoint_3", 15))
    with pytest.warns(UserWarning, match=f"skipping corrupted checkpoint .*checkpoint_3: {shard}"):
        info = resolve_resume("auto", str(runs / "second"), str(runs / "second" / "checkpoints"))
    assert info.step == 10 and info.path.endswith("checkpoint_2")
    # the same choice for a restart, which looks for the newest complete one of this run (restarts.py)
    with pytest.warns(UserWarning, match="skipping corrupted checkpoint"):
        assert newest_complete_checkpoint([str(storage)]).step == 10
    # and for resume=<run directory>
    with pytest.warns(UserWarning, match="skipping corrupted checkpoint"):
        assert resolve_resume(str(runs / "first"), str(runs / "second"), "").step == 10


def test_only_corrupted_checkpoints_leave_nothing_to_resume(tmp_path):
    overwrite(fake_checkpoint(tmp_path / "run", "checkpoint_1", 5))
    with pytest.warns(UserWarning, match="skipping corrupted checkpoint"):
        assert newest_complete_checkpoint([str(tmp_path)]) is None
    with pytest.warns(UserWarning), pytest.raises(UserError, match="holds no complete checkpoint"):
        resolve_resume(str(tmp_path / "run"), str(tmp_path / "other"), "")


def test_older_checkpoints_are_not_read_once_the_newest_verifies(tmp_path, monkeypatch):
    """Verifying reads every byte: newest first, and no further than the first that passes."""
    import orchestrator.checkpoint as checkpoint

    fake_checkpoint(tmp_path, "checkpoint_1", 5)
    overwrite(fake_checkpoint(tmp_path, "checkpoint_2", 10))  # corrupted but older: never read
    fake_checkpoint(tmp_path, "checkpoint_3", 15)
    read = []
    monkeypatch.setattr(checkpoint, "file_checksum", lambda path: read.append(path) or file_checksum(path))
    checkpoint._checksums.clear()
    assert newest_complete_checkpoint([str(tmp_path)]).step == 15
    assert read and all("checkpoint_3" in path for path in read)


def test_a_file_is_checksummed_once_per_process_unless_it_changes(tmp_path, monkeypatch):
    import os
    import time

    import orchestrator.checkpoint as checkpoint

    path = fake_checkpoint(tmp_path, "checkpoint_1", 5)
    past = time.time() - 60  # written a minute ago: old enough to remember
    for file in path.rglob("*.pt"):
        os.utime(file, (past, past))
    read = []
    monkeypatch.setattr(checkpoint, "file_checksum", lambda file: read.append(file) or file_checksum(file))
    checkpoint._checksums.clear()
    assert checkpoint_info(str(path)).step == 5 and checkpoint_info(str(path)).step == 5
    assert len(read) == 2  # two ranks' shards, once each
    overwrite(path)  # a new mtime (and too recent to remember)
    assert checkpoint_info(str(path)) is None and checkpoint_info(str(path)) is None
    assert len(read) == 2 + 2 and read[-1] == read[-2]  # rank 1's shard, read again each time; rank 0's remembered


def test_resume_naming_a_corrupted_checkpoint_is_refused_with_the_file(tmp_path):
    shard = overwrite(fake_checkpoint(tmp_path, "checkpoint_7", 5))
    with pytest.raises(UserError, match=f"resume=.*checkpoint_7 is a corrupted checkpoint: {shard} does not match"):
        resolve_resume(str(tmp_path / "checkpoint_7"), str(tmp_path), str(tmp_path))


def test_the_checksum_is_the_crc32_of_the_whole_file_in_chunks(tmp_path):
    import zlib

    import orchestrator.checkpoint as checkpoint

    data = bytes(range(256)) * (3 * checkpoint.CHUNK // 256 + 7)  # more than three chunks, the last one short
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(str(tmp_path / "f")) == f"{zlib.crc32(data):08x}"
    (tmp_path / "empty").write_bytes(b"")
    assert file_checksum(str(tmp_path / "empty")) == "00000000"


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
