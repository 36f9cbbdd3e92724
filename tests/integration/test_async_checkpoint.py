"""Checkpoints written in the background (trainer.async_checkpoint, the default) against synchronous ones, on the
2-worker ZeRO-3 run of tests/integration/test_resume.py (a tiny Llama with attention dropout, 20 steps, a checkpoint
every 5, Ray Train's CheckpointConfig keeping 2).

The asynchronous run has the synchronous run's losses, keeps the same checkpoints (steps 15 and 20: pruning is
unchanged), every kept one complete and verified, its ZeRO-3 optimizer shards byte for byte the synchronous run's
(their checksums in the markers) and the same torch generator states, and the same export. A worker killed at step
12 restarts from the step-10 checkpoint written in the background and finishes with the synchronous run's losses.
That a checkpoint is reported only once its files and marker are written, and that a failure in the background is
raised, is tests/unit/test_checkpoint_writer.py's (a slowed writer, no Ray).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from orchestrator.__main__ import execute
from orchestrator.checkpoint import RNG_DIR, check_checkpoint, read_markers
from tests.conftest import compose_run
from tests.integration.test_resume import EVERY, KILL_AT, STEPS, assert_same_losses, overrides

pytestmark = pytest.mark.ray


def kept_checkpoints(run_dir: Path) -> dict:
    """step -> (the checkpoint's directory, {rank: {file: checksum}} of its ZeRO-3 optimizer shards (fp32 weights,
    Adam moments), {rank: torch's generator state}). Rank 0's model states also hold the run's notes, wall-clock times
    included, and Python's and NumPy's generators (nothing in training draws from them) start unseeded in every
    worker: those differ between any two runs."""
    kept = {}
    for path in sorted(p for p in (run_dir / "checkpoints").glob("*/*/checkpoint_*") if p.is_dir()):
        markers, why = read_markers(str(path))
        assert not why, (path, why)
        sums = {m["rank"]: {name: crc for name, crc in m["crc32"].items() if "optim_states" in name} for m in markers}
        generators = {m["rank"]: torch.load(path / RNG_DIR / f"rank_{m['rank']}.pt", weights_only=True)["torch"]
                      for m in markers}
        kept[markers[0]["step"]] = (path, sums, generators)
    return kept


def export_digest(run_dir: Path) -> dict:
    """The export's files but its model card (README.md: the run's own directory, id and times)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run_dir / "export").iterdir()
            if p.is_file() and p.name != "README.md"}


@pytest.fixture(scope="module")
def synchronous(ray_cluster, tiny_llama_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("synchronous")
    metrics = execute(compose_run(overrides(tiny_llama_dir, "trainer.async_checkpoint=false"), run_dir))
    return run_dir, metrics


def test_background_checkpoints_are_the_synchronous_ones(synchronous, tiny_llama_dir, tmp_path):
    sync_dir, sync_metrics = synchronous
    metrics = execute(compose_run(overrides(tiny_llama_dir), tmp_path / "run"))
    assert metrics["checkpoint/asynchronous"] and not sync_metrics["checkpoint/asynchronous"]
    assert_same_losses(metrics["train/loss_history"], sync_metrics["train/loss_history"])
    assert metrics["checkpoint/steps"] == sync_metrics["checkpoint/steps"] == list(range(EVERY, STEPS, EVERY))
    ours, theirs = kept_checkpoints(tmp_path / "run"), kept_checkpoints(sync_dir)
    assert sorted(ours) == sorted(theirs) == [STEPS - EVERY, STEPS]  # keep_checkpoints=2 pruned as before
    for step, (path, sums, generators) in ours.items():
        info, why = check_checkpoint(str(path))  # complete, every file as its rank wrote it
        assert info is not None and info.step == step, why
        assert sums == theirs[step][1] and len(sums) == 2 and all(sums.values()), (step, sums, theirs[step][1])
        assert all(generators[rank].equal(theirs[step][2][rank]) for rank in (0, 1))  # the dropout's generator
    assert export_digest(tmp_path / "run") == export_digest(sync_dir)  # the final export as before
    # the shards were written on the background thread (write), not by save_checkpoint in the loop
    assert all(w > 0 for w in metrics["checkpoint/write_s"]) and not any(sync_metrics["checkpoint/write_s"])
    print(f"\nper checkpoint, the loop waited {metrics['checkpoint/blocked_s']} s (background) against "
          f"{sync_metrics['checkpoint/blocked_s']} s (synchronous); "
          f"complete after {metrics['checkpoint/complete_s']} s")


def test_a_killed_worker_restarts_from_a_checkpoint_written_in_the_background(
        synchronous, tiny_llama_dir, tmp_path, monkeypatch):
    _, sync_metrics = synchronous
    monkeypatch.setenv("ORCHESTRATOR_KILL_WORKER", f"1:{KILL_AT}")
    metrics = execute(compose_run(overrides(tiny_llama_dir, "trainer.max_failures=1"), tmp_path / "run"))
    assert (tmp_path / "run" / ".fault_injected").exists() and metrics["train/restarts"] == 1
    assert metrics["train/repeated_steps"] == KILL_AT - 1 - 10  # from the step-10 checkpoint, written in the background
    assert_same_losses(metrics["train/loss_history"], sync_metrics["train/loss_history"])
