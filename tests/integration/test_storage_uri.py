"""Checkpoint storage given as a URI: cluster.storage_path=file:///... goes to Ray Train as a URI, which it resolves
through pyarrow's filesystem layer (as it would s3:// or gs://), and our side (markers, checksums, resume=auto,
resume=<checkpoint URI>, a restart's search for the newest complete checkpoint, the export) goes through the same
layer: the checkpoints are found and named by URI. No network: file:// is pyarrow's LocalFileSystem reached through
the URI path (an in-memory object store would not do across processes: each Ray worker would get its own).

A tiny Llama with attention dropout (the random state matters) trains 12 steps on 2 ZeRO-3 workers, a checkpoint every
4 steps, its storage a file:// URI. Then: worker 1 kills itself as step 10 starts and Ray Train restarts both from the
step-8 checkpoint in that storage; resume=auto from another run directory finds the finished run's step-12
checkpoint there (nothing left to train); resume=<the step-8 checkpoint's URI> trains steps 9-12. Every run's
per-step losses equal the uninterrupted run's (1e-6 relative, as tests/integration/test_resume.py; in practice
identical), and every run that trained has its export.
"""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.__main__ import execute
from orchestrator.checkpoint import checkpoint_info, newest_complete_checkpoint
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray
STEPS, EVERY, KILL_AT = 12, 4, 10
TOLERANCE = 1e-6


def overrides(model_dir, storage: str, *extra):
    return [*tiny_llama_run(model_dir), f"trainer.max_steps={STEPS}", "trainer.eval_generate_rows=0",
            f"trainer.checkpoint_every={EVERY}", "trainer.micro_batch_size=2", "cluster.cpu_workers=2",
            "trainer.eval_every=0", "data.max_length=64", "data.max_validation_rows=4", "optim.lr=3e-3",
            "+model.config_overrides.attention_dropout=0.1", f"cluster.storage_path={storage}", *extra]


def assert_same_losses(resumed, uninterrupted):
    assert len(resumed) == STEPS
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=TOLERANCE, atol=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("object-store")
    return directory, f"file://{directory}"


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_llama_dir, tmp_path_factory, store):
    run_dir = tmp_path_factory.mktemp("runs") / "run" / "first"
    metrics = execute(compose_run(overrides(tiny_llama_dir, store[1]), run_dir))
    return run_dir, metrics["train/loss_history"]


def test_a_run_writes_its_checkpoints_to_the_storage_uri(uninterrupted, store):
    run_dir, _ = uninterrupted
    directory, uri = store
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert json.loads((run_dir / "run.json").read_text())["storage"] == f"{uri}/run/{run_id}"
    assert not (run_dir / "checkpoints").exists()  # nothing in the run directory
    kept = sorted(p for p in (directory / "run" / run_id).glob("checkpoint_*") if checkpoint_info(str(p)))
    assert [checkpoint_info(str(p)).step for p in kept] == [8, 12]  # trainer.keep_checkpoints=2
    newest = newest_complete_checkpoint([f"{uri}/run/{run_id}"])
    assert newest.step == STEPS and newest.path.startswith(f"{uri}/run/{run_id}/checkpoint_")
    assert (run_dir / "export" / "config.json").is_file()


def test_a_killed_worker_restarts_from_the_storage_uri(uninterrupted, tiny_llama_dir, store, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_KILL_WORKER", f"1:{KILL_AT}")
    metrics = execute(compose_run(overrides(tiny_llama_dir, store[1], "trainer.max_failures=1"), tmp_path / "run"))
    assert (tmp_path / "run" / ".fault_injected").exists()  # the worker really was killed
    assert metrics["train/restarts"] == 1
    assert metrics["train/repeated_steps"] == KILL_AT - 1 - 8  # step 9 again, after the step-8 checkpoint
    assert_same_losses(metrics["train/loss_history"], uninterrupted[1])
    assert (tmp_path / "run" / "export" / "config.json").is_file()


def test_resume_auto_finds_the_newest_checkpoint_in_the_storage_uri(uninterrupted, tiny_llama_dir, store,
                                                                   tmp_path_factory):
    """From a run directory under another parent: only the storage holds this experiment's checkpoints. The newest
    complete one is the finished run's (or the restarted run's) step 12: resuming it trains nothing."""
    run = compose_run(overrides(tiny_llama_dir, store[1], "resume=auto"), tmp_path_factory.mktemp("elsewhere") / "x")
    metrics = execute(run)
    assert run.resume.startswith(f"{store[1]}/run/") and run.resume.split("/")[-1].startswith("checkpoint_")
    assert metrics["step"] == STEPS
    assert metrics["train/loss_history"] == uninterrupted[1]  # the saved history, no step trained again


def test_resume_from_a_checkpoint_uri_continues_with_the_same_losses(uninterrupted, tiny_llama_dir, store, tmp_path):
    run_dir, losses = uninterrupted
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    step_8 = next(p for p in (store[0] / "run" / run_id).glob("checkpoint_*") if checkpoint_info(str(p)).step == 8)
    uri = f"{store[1]}/run/{run_id}/{step_8.name}"
    run = compose_run(overrides(tiny_llama_dir, store[1], f"resume={uri}"), tmp_path / "again")
    metrics = execute(run)
    assert run.resume == uri  # handed to the workers as the URI, read through pyarrow (checkpoint.restore)
    assert metrics["train/loss_history"][:8] == losses[:8]  # from the checkpoint's history
    assert_same_losses(metrics["train/loss_history"], losses)  # steps 9-12 trained again, identically
    assert (tmp_path / "again" / "export" / "config.json").is_file()


def test_orchestrator_export_reads_the_checkpoint_from_the_storage_uri(uninterrupted, store, tiny_llama_dir, tmp_path):
    """`orchestrator export RUN_DIR` follows run.json's storage URI (through Ray's Checkpoint, which downloads from an
    object store and reads file:// in place) and writes the same weights as the run's own export; a storage this
    machine cannot see is said, not silently replaced by the run directory."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from orchestrator.errors import UserError
    from orchestrator.export_cmd import main as export

    run_dir, _ = uninterrupted
    # what the CLI writes beside a run (.hydra/config.yaml), which execute() in this process did not
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.structured(compose_run(overrides(tiny_llama_dir, store[1]), run_dir)),
                   run_dir / ".hydra" / "config.yaml")
    out = tmp_path / "exported"
    assert export([str(run_dir), "--out", str(out)]) == 0
    mine, runs = load_file(out / "model.safetensors"), load_file(run_dir / "export" / "model.safetensors")
    assert mine.keys() == runs.keys() and all(torch.equal(mine[k], runs[k]) for k in runs)

    elsewhere = tmp_path / "moved_run"
    elsewhere.mkdir()
    (elsewhere / ".hydra").mkdir()
    (elsewhere / ".hydra" / "config.yaml").write_text((run_dir / ".hydra" / "config.yaml").read_text())
    (elsewhere / "run.json").write_text(json.dumps({"storage": str(tmp_path / "not_mounted")}))
    with pytest.raises(UserError, match="which this machine does not see"):
        export([str(elsewhere), "--out", str(tmp_path / "never")])
