"""Issue 17 through the real CLI, on one tiny training: a starter file written by `orchestrator init` trains as
is (with the command line's keys that make it tiny); the run leaves checkpoints at every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

CONSOLE_SCRIPT = Path(sys.executable).parent / "orchestrator"
ENV = {**os.environ, "WANDB_MODE": "disabled"}
STEPS = 3
TINY = [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3",
        "trainer.micro_batch_size=2", "cluster.cpu_workers=2", "data.max_length=64", "data.max_validation_rows=2",
        "trainer.eval_generate_rows=0", "trainer.select_best=false", "logger.mode=disabled"]


def orchestrator(*args, cwd, timeout=600):
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, its checkpoints by step): `orchestrator init --model tiny_llama`, then
    `orchestrator train tiny.yaml <tiny keys>` with 2 CPU workers (ZeRO-3 shards on two ranks)."""
    home = tmp_path_factory.mktemp("run-file")
    written = orchestrator("init", "--model", "tiny_llama", "--out", "tiny.yaml", cwd=home, timeout=120)
    assert written.returncode == 0, written.stderr
    run_dir = home / "run"
    result = orchestrator("train", "tiny.yaml", *TINY, f"hydra.run.dir={run_dir}", cwd=home)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoints = {}
    for marker in run_dir.glob("checkpoints/*/*/checkpoint_*/complete/rank_0.json"):
        checkpoints[json.loads(marker.read_text())["step"]] = marker.parents[1]
    return run_dir, checkpoints


def test_an_init_file_trains_as_is(trained):
    run_dir, checkpoints = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["train/loss_history"]) == STEPS
    assert (run_dir / "export" / "config.json").is_file() and list((run_dir / "export").glob("*.safetensors"))
    assert sorted(checkpoints) == [1, 2, 3]
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "name: tiny" in config and "path: builtin:tiny-llama" in config


def logits(model_dir_or_model, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = (AutoModelForCausalLM.from_pretrained(model_dir_or_model, dtype=torch.float32)
             if isinstance(model_dir_or_model, (str, Path)) else model_dir_or_model)
    with torch.no_grad():
        return model.eval()(ids).logits


def test_export_of_a_mid_run_checkpoint_gives_that_checkpoints_logits(trained, tmp_path):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.model import resolve_model_path

    run_dir, checkpoints = trained
    out = tmp_path / "step2"
    result = orchestrator("export", checkpoints[2], "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"export: {out} (step 2 of {run_dir}, full weights, fp32)\n"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    # the oracle: the step-2 weights read straight from the ZeRO shards into the model's own class and shape
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints[2] / "deepspeed"), tag="zero")
    reference = LlamaForCausalLM(LlamaConfig.from_pretrained(resolve_model_path("builtin:tiny-llama")))
    reference.load_state_dict(state, strict=True)
    ids = torch.tensor([[2, 17, 400, 31, 5, 99, 3]])
    exported = logits(out, ids)
    assert torch.equal(exported, logits(reference, ids))
    final = logits(run_dir / "export", ids)  # the run's own export: the last step's weights, not step 2's
    assert (exported - final).abs().max() > 1e-6


def test_export_of_the_run_takes_its_newest_checkpoint_and_equals_the_runs_export(trained, tmp_path):
    import torch

    run_dir, _ = trained
    ids = torch.tensor([[2, 17, 400, 31, 5, 99, 3]])
    out = tmp_path / "last"
    result = orchestrator("export", run_dir, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"(step {STEPS} of {run_dir}" in result.stdout
    assert torch.equal(logits(out, ids), logits(run_dir / "export", ids))

    half = tmp_path / "bf16"
    assert orchestrator("export", run_dir, "--dtype", "bf16", "--out", half, cwd=tmp_path).returncode == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16
    sharded = tmp_path / "sharded"
    assert orchestrator("export", run_dir, "--shard-size", "2MB", "--out", sharded, cwd=tmp_path).returncode == 0
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(sharded, ids), logits(run_dir / "export", ids))
    again = orchestrator("export", run_dir, "--out", out, cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.endswith(f"error: {out} exists and is not empty: choose another "
                                                           "--out\n")


def test_export_refuses_an_incomplete_checkpoint(trained, tmp_path):
    import shutil

    run_dir, checkpoints = trained
    copy = tmp_path / "run" / "checkpoints" / "checkpoint_cut"
    shutil.copytree(run_dir / ".hydra", tmp_path / "run" / ".hydra")
    shutil.copytree(checkpoints[1], copy)
    (copy / "complete" / "rank_1.json").unlink()
    result = orchestrator("export", copy, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"error: {copy} is not a complete checkpoint (a rank did not finish "
                                              "writing it): give another, or the run directory for its newest "
                                              "complete one")


def test_export_of_a_one_worker_lora_run_merges_its_adapter_onto_the_same_base(trained, tmp_path):
    """One worker training adapters keeps only the trainable weights (PlainEngine): the export rebuilds the base
    (here model.init=random, from the run's seed) and merges the adapter, as the run's own export did."""
    import torch

    home = trained[0].parent
    run_dir = tmp_path / "lora"
    result = orchestrator("train", "tiny.yaml", "strategy=lora", *[o for o in TINY if "cpu_workers" not in o],
                          "cluster.cpu_workers=1", "trainer.max_steps=2", f"hydra.run.dir={run_dir}", cwd=home)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "merged"
    exported = orchestrator("export", run_dir, "--out", out, cwd=home)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.endswith("adapter/ and merged weights, fp32)\n")
    assert (out / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[2, 17, 400, 31, 5, 99, 3]])
    assert torch.equal(logits(out, ids), logits(run_dir / "export", ids))
    adapter_only = tmp_path / "adapter"
    assert orchestrator("export", run_dir, "--no-merge", "--out", adapter_only, cwd=home).returncode == 0
    assert sorted(p.name for p in adapter_only.iterdir() if p.suffix == ".safetensors") == []
    assert (adapter_only / "adapter" / "adapter_model.safetensors").is_file()
