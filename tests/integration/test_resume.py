"""Exact resume, surviving a killed worker, and what does not count as resuming.

A tiny Llama with attention dropout (so that the random state matters) trains 20 steps on 2 ZeRO-3 workers with a
checkpoint every 5 steps. Worker 1 kills itself (SIGKILL) as step 12 starts. With trainer.max_failures=1, Ray Train
restarts both workers from the step-10 checkpoint and the run completes by itself; with max_failures=0 the run fails
and a second command with resume=auto continues it, skipping a newer checkpoint that was cut short. Either way the
per-step losses equal the uninterrupted run's: model, optimizer, scheduler, every rank's RNG (dropout) and the data
position are all restored, and the fp32 arithmetic is the same, so the tolerance is 1e-6 relative (in practice they
are identical).

A second run that shares the first's storage starts fresh in its own place; one in the same run directory, or one
that resumes with another schedule or strategy, or on a number of workers that cannot keep the global batch, stops
before any worker starts (UserError).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.__main__ import execute, resume_from
from orchestrator.errors import UserError
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray
STEPS, EVERY, KILL_AT = 20, 5, 12
TOLERANCE = 1e-6
DROPOUT = 0.1  # the tiny Llama's attention dropout (its config has none)


def overrides(model_dir, *extra):
    return [*tiny_llama_run(model_dir), f"trainer.max_steps={STEPS}", "trainer.eval_generate_rows=0",
            f"trainer.checkpoint_every={EVERY}", "trainer.micro_batch_size=2", "cluster.cpu_workers=2",
            "data.max_length=64", "data.max_validation_rows=4", "optim.lr=3e-3",
            f"+model.config_overrides.attention_dropout={DROPOUT}", *extra]


@pytest.fixture(scope="module")
def uninterrupted_run(ray_cluster, tiny_llama_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, execute(compose_run(overrides(tiny_llama_dir), run_dir))["train/loss_history"]


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[1]


def assert_same_losses(resumed, uninterrupted):
    assert len(resumed) == STEPS
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=TOLERANCE, atol=0)


def test_a_killed_worker_is_restarted_and_the_run_completes_with_the_same_losses(
        uninterrupted, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_KILL_WORKER", f"1:{KILL_AT}")
    run = compose_run(overrides(tiny_llama_dir, "trainer.max_failures=1"), tmp_path / "run")
    metrics = execute(run)
    assert (tmp_path / "run" / ".fault_injected").exists()  # the worker really was killed
    assert metrics["train/restarts"] == 1
    # steps 11 ran before the kill and again after the restart from the step-10 checkpoint
    assert metrics["train/repeated_steps"] == KILL_AT - 1 - 10
    print(f"repeated steps after the kill at step {KILL_AT}: {metrics['train/repeated_steps']}")
    assert_same_losses(metrics["train/loss_history"], uninterrupted)
    assert (tmp_path / "run" / "export" / "config.json").is_file()


def test_resume_auto_continues_a_failed_run_and_skips_a_truncated_checkpoint(
        uninterrupted, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_KILL_WORKER", f"1:{KILL_AT}")
    failed = compose_run(overrides(tiny_llama_dir, "trainer.max_failures=0"), tmp_path / "first")
    with pytest.raises(Exception):
        execute(failed)
    assert not (tmp_path / "first" / "metrics.json").exists() and not (tmp_path / "first" / "export").exists()
    monkeypatch.delenv("ORCHESTRATOR_KILL_WORKER")

    # a newer checkpoint whose copy was cut short: its marker claims step 15, one shard is truncated
    complete = sorted(p for p in (tmp_path / "first" / "checkpoints").glob("*/*/checkpoint_*") if p.is_dir())[-1]
    truncated = complete.parent / "checkpoint_9999-12-31_23-59-59.000000"
    shutil.copytree(complete, truncated)
    for marker in (truncated / "complete").glob("*.json"):
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "step": 15}))
    shard = next(p for p in (truncated / "deepspeed").rglob("*.pt") if p.stat().st_size > 1000)
    shard.write_bytes(shard.read_bytes()[:1000])

    resumed = compose_run(overrides(tiny_llama_dir, "resume=auto"), tmp_path / "second")
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint_9999"):
        resume_from(resumed)
    assert Path(resumed.resume) == complete
    resumed.resume = "auto"
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        metrics = execute(resumed)
    assert_same_losses(metrics["train/loss_history"], uninterrupted)


def test_resuming_a_finished_run_changes_nothing(uninterrupted_run, tiny_llama_dir, tmp_path):
    finished_dir, losses = uninterrupted_run
    run = compose_run(overrides(tiny_llama_dir, f"resume={finished_dir}"), tmp_path / "again")
    metrics = execute(run)
    assert metrics["step"] == STEPS
    assert metrics["train/loss_history"] == losses  # the saved history, no step trained again
    assert (tmp_path / "again" / "export" / "config.json").is_file()


def test_a_second_run_sharing_the_storage_starts_fresh_in_its_own_place(uninterrupted_run, tiny_llama_dir, tmp_path):
    """Before run ids, Ray Train took the finished run's checkpoints for its own and "resumed" at step 20."""
    finished_dir, losses = uninterrupted_run
    storage = finished_dir / "checkpoints"
    metrics = execute(compose_run(overrides(tiny_llama_dir, f"cluster.storage_path={storage}"), tmp_path / "second"))
    assert "train/restarts" not in metrics
    assert_same_losses(metrics["train/loss_history"], losses)  # all 20 steps trained, from the same start
    first_id = json.loads((finished_dir / "run.json").read_text())["run_id"]
    second_id = json.loads((tmp_path / "second" / "run.json").read_text())["run_id"]
    assert first_id != second_id
    assert {p.name for p in (storage / "run").iterdir()} >= {first_id, second_id}  # one directory per run


def test_a_second_run_in_the_same_run_directory_is_refused(uninterrupted_run, tiny_llama_dir):
    finished_dir, _ = uninterrupted_run
    before = sorted(p.name for p in finished_dir.iterdir())
    with pytest.raises(UserError, match="already holds run .*: add resume=auto to continue it"):
        execute(compose_run(overrides(tiny_llama_dir), finished_dir))
    assert sorted(p.name for p in finished_dir.iterdir()) == before  # nothing of it overwritten


@pytest.mark.parametrize("change, message", [
    (["trainer.max_steps=30"], r"schedule differs .*total_steps 20 -> 30.*resume with trainer.max_steps=20"),
    (["trainer.max_steps=null", "trainer.epochs=1"], r"schedule differs .*resume with trainer.max_steps=20"),
    # another number of workers resumes (tests/integration/test_resume_world_size.py) if it can keep the global batch
    (["cluster.cpu_workers=1", "trainer.micro_batch_size=3"],
     r"global batch of 4 rows .*set trainer.micro_batch_size to one of 1, 2, 4"),
    (["strategy=lora"], r"trained with strategy=full and this run plans strategy=lora: resume with strategy=full"),
])
def test_resuming_with_another_schedule_workers_or_strategy_stops_before_training(
        uninterrupted_run, tiny_llama_dir, tmp_path, change, message):
    finished_dir, _ = uninterrupted_run
    run = compose_run(overrides(tiny_llama_dir, f"resume={finished_dir}", *change), tmp_path / "again")
    with pytest.raises(UserError, match=message):
        execute(run)
    assert not (tmp_path / "again" / "run.json").exists()  # no worker started


def test_the_model_trains_with_its_dropout_on(uninterrupted, tiny_llama_dir, tmp_path):
    """from_pretrained hands the model over in eval mode; the first step's loss (the same batch and weights) differs
    once the dropout is taken away, so it was on."""
    run = compose_run(overrides(tiny_llama_dir, "model.config_overrides.attention_dropout=0.0", "trainer.max_steps=1",
                                "trainer.checkpoint_every=0"), tmp_path / "no_dropout")
    without = execute(run)["train/loss_history"]
    assert abs(without[0] - uninterrupted[0]) > 1e-4, (without[0], uninterrupted[0])
