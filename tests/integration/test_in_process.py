"""A one-worker run trains in the driver's own process (cluster.in_process=auto: Ray Train's local mode, Ray not
started; launch/in_process.py), and what it does there is what Ray Train's worker does.

A tiny Llama with attention dropout (the random state matters) trains 8 steps on one CPU worker, a checkpoint every 2
steps, 2 kept. The reference is the same run on a Ray Train worker (cluster.in_process=false). In-process:
- the recipe runs in this process (a spy on Recipe.run sees it), Ray is not started by it, the plan says so;
- the per-step losses equal the reference's (1e-6 relative, as the exact-resume tests: the same fp32 arithmetic, one
  rank; a lost or repeated RNG draw, batch or optimizer step moves them by far more);
- its checkpoints are in the run's storage as Ray Train lays them out, only the newest 2 of them, and the export is
  copied from the last one; a file:// storage URI takes them the same way;
- an exception in the training function is retried in this process from the newest complete checkpoint (and said
  on the console), with the reference's losses; a UserError is not retried;
- a run that failed after a checkpoint is continued in-process by resume=auto, with the reference's losses;
- the finished run leaves no DeepSpeed engine alive in this process (its model and optimizer state freed).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from orchestrator import train_loop
from orchestrator.__main__ import execute
from orchestrator.checkpoint import checkpoint_info
from orchestrator.errors import UserError
from tests.conftest import compose_run, tiny_llama_run

STEPS, EVERY, KEEP = 8, 2, 2
TOLERANCE = 1e-6


def overrides(model_dir, *extra):
    return [*tiny_llama_run(model_dir), f"trainer.max_steps={STEPS}", "trainer.eval_generate_rows=0",
            f"trainer.checkpoint_every={EVERY}", f"trainer.keep_checkpoints={KEEP}", "trainer.micro_batch_size=2",
            "cluster.cpu_workers=1", "trainer.eval_every=0", "data.max_length=64", "data.max_validation_rows=4",
            "optim.lr=3e-3", "+model.config_overrides.attention_dropout=0.1", *extra]


def assert_same_losses(losses, reference):
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=TOLERANCE, atol=0)


@pytest.fixture
def recipes_here(monkeypatch):
    """The process ids that Recipe.run ran in, as far as this process sees (a Ray worker's runs are not seen)."""
    pids = []
    run = train_loop.Recipe.run

    def spied(self):
        pids.append(os.getpid())
        return run(self)

    monkeypatch.setattr(train_loop.Recipe, "run", spied)
    return pids


def failing_once(monkeypatch, at_step: int, error: Exception):
    """Recipe.train_step raises `error` as 0-based step `at_step` starts, the first time only; returns the calls."""
    calls = []
    step = train_loop.Recipe.train_step

    def train_step(self, index):
        calls.append(index)
        if index == at_step and calls.count(at_step) == 1:
            raise error
        return step(self, index)

    monkeypatch.setattr(train_loop.Recipe, "train_step", train_step)
    return calls


def stored_steps(run_dir) -> list:
    """The steps of the complete checkpoints in the run's storage (Ray Train's layout: checkpoints/<name>/<run id>)."""
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    found = sorted((run_dir / "checkpoints" / "run" / run_id).glob("checkpoint_*"))
    return [checkpoint_info(str(p)).step for p in found if checkpoint_info(str(p))]


@pytest.fixture(scope="module")
def in_process_run(tiny_llama_dir, tmp_path_factory):
    """The run as a user starts it (cluster.in_process=auto), with what it left: (run_dir, metrics, pids, Ray
    started before, Ray started after, DeepSpeed engines alive before and after it, garbage collected)."""
    import ray

    run_dir = tmp_path_factory.mktemp("in_process")
    pids = []
    run = train_loop.Recipe.run
    train_loop.Recipe.run = lambda self: (pids.append(os.getpid()), run(self))[1]
    try:
        was_up, engines_before = ray.is_initialized(), live_engines()
        metrics = execute(compose_run(overrides(tiny_llama_dir), run_dir))
        is_up, engines_after = ray.is_initialized(), live_engines()
    finally:
        train_loop.Recipe.run = run
    return run_dir, metrics, pids, was_up, is_up, (engines_before, engines_after)


def live_engines() -> int:
    """DeepSpeed engines still reachable in this process after a garbage collection."""
    import gc

    import deepspeed

    gc.collect()
    return sum(isinstance(o, deepspeed.DeepSpeedEngine) for o in gc.get_objects())


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny_llama_dir, tmp_path_factory):
    """The same run on a Ray Train worker: its per-step losses."""
    run_dir = tmp_path_factory.mktemp("ray_worker")
    metrics = execute(compose_run(overrides(tiny_llama_dir, "cluster.in_process=false"), run_dir))
    assert metrics["launch/in_process"] is False
    return metrics["train/loss_history"]


@pytest.mark.ray
def test_a_one_worker_run_trains_in_this_process_as_a_ray_worker_does(in_process_run, reference):
    run_dir, metrics, pids, was_up, is_up, engines = in_process_run
    assert pids == [os.getpid()] and metrics["launch/in_process"] is True
    # the finished run's engine, model and optimizer state are freed (engine.destroy and DeepSpeed's module-level
    # references dropped, launch/in_process.py): on a GPU they held the next run's memory
    assert engines[1] == engines[0], f"DeepSpeed engines alive before / after the run: {engines}"
    assert is_up == was_up  # the in-process run started no Ray (the reference's cluster may have been up already)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["in_process"] is True and plan["launch_reason"].startswith("in this process, without starting Ray")
    assert plan["zero_stage"] == 3  # the engine whose release is checked above is DeepSpeed's
    assert_same_losses(metrics["train/loss_history"], reference)
    assert stored_steps(run_dir) == [6, 8]  # checkpoints at 2, 4, 6 and the final 8; trainer.keep_checkpoints=2
    assert (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "logs" / "worker_0.log").is_file()  # the libraries' output, not the console's


@pytest.mark.ray
def test_an_exception_is_retried_in_this_process_from_the_newest_checkpoint(reference, tiny_llama_dir, tmp_path,
                                                                           monkeypatch, capfd, recipes_here):
    calls = failing_once(monkeypatch, at_step=5, error=RuntimeError("injected"))  # as step 6 starts: after step 5
    metrics = execute(compose_run(overrides(tiny_llama_dir), tmp_path / "run"))
    assert recipes_here == [os.getpid()] * 2  # the first attempt and its restart, both here
    assert calls.count(5) == 2 and calls.count(4) == 2  # restarted from the step-4 checkpoint: step 5 again
    assert metrics["train/restarts"] == 1 and metrics["train/repeated_steps"] == 1
    assert_same_losses(metrics["train/loss_history"], reference)
    out = capfd.readouterr().out
    assert "training failed (RuntimeError: injected); restarting from the newest complete checkpoint, restart 1 of " \
           "trainer.max_failures=2" in out
    assert "resumed at step 4 after 1 restart(s), 1 step(s) repeated" in out  # the restarted recipe's own note
    assert "Traceback" in (tmp_path / "run" / "logs" / "worker_0.log").read_text()
    assert (tmp_path / "run" / "export" / "config.json").is_file()


def test_a_user_error_in_training_is_not_retried(tiny_llama_dir, tmp_path, monkeypatch, recipes_here):
    calls = failing_once(monkeypatch, at_step=2, error=UserError("data.path: a row went bad"))
    console = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    with pytest.raises(UserError, match="a row went bad"):
        execute(compose_run(overrides(tiny_llama_dir), tmp_path / "run"))
    assert recipes_here == [os.getpid()] and calls == [0, 1, 2]
    # stdout and stderr, which the recipe had sent to its log, are the console's again
    assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == console


@pytest.mark.ray
def test_resume_auto_continues_a_failed_run_in_this_process(reference, tiny_llama_dir, tmp_path, monkeypatch):
    """Runs under one parent, as the CLI lays them out: resume=auto looks through the run directory's parent."""
    failing_once(monkeypatch, at_step=5, error=RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        execute(compose_run(overrides(tiny_llama_dir, "trainer.max_failures=0"), tmp_path / "runs" / "first"))
    assert stored_steps(tmp_path / "runs" / "first") == [2, 4]
    assert not (tmp_path / "runs" / "first" / "export").exists()
    monkeypatch.undo()
    resumed = compose_run(overrides(tiny_llama_dir, "resume=auto"), tmp_path / "runs" / "second")
    metrics = execute(resumed)
    assert os.path.basename(resumed.resume).startswith("checkpoint_") and metrics["launch/in_process"] is True
    assert_same_losses(metrics["train/loss_history"], reference)  # steps 1-4 from the checkpoint, 5-8 trained here
    assert (tmp_path / "runs" / "second" / "export" / "config.json").is_file()


@pytest.mark.ray
def test_a_storage_uri_takes_the_checkpoints_in_process(reference, tiny_llama_dir, tmp_path):
    """file://: pyarrow's LocalFileSystem through a URI, as tests/integration/test_storage_uri.py on Ray workers."""
    store = tmp_path / "store"
    run_dir = tmp_path / "run"
    metrics = execute(compose_run(overrides(tiny_llama_dir, f"cluster.storage_path=file://{store}"), run_dir))
    assert_same_losses(metrics["train/loss_history"], reference)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    kept = sorted(p for p in (store / "run" / run_id).iterdir())
    assert [p.name.startswith("checkpoint_") for p in kept] == [True, True]  # nothing else left there (.writing)
    assert [checkpoint_info(f"file://{p}").step for p in kept] == [6, 8]
    assert not (run_dir / "checkpoints").exists() and (run_dir / "export" / "config.json").is_file()


def test_ctrl_c_in_this_process_says_what_was_kept_and_how_to_resume(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A Ctrl-C reaches the recipe here as KeyboardInterrupt: no restart; the CLI's line and exit code 130."""
    from tests.unit.test_bad_input import run_cli

    calls = failing_once(monkeypatch, at_step=3, error=KeyboardInterrupt())  # as step 4 starts: after step 2's save
    code, stderr = run_cli([*overrides(tiny_llama_dir), f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 130 and calls == [0, 1, 2, 3]
    kept = stderr.strip().splitlines()[-1]
    assert kept.startswith("interrupted: kept the last complete checkpoint, step 2, at "), stderr
    assert f"{tmp_path / 'run'}/checkpoints/run/" in kept and kept.split()[-1].startswith("resume=")
