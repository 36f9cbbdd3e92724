"""bench/hf_baseline.py on CPU: Trainer + LoRA on one process, Trainer + DeepSpeed ZeRO-3 on two (gloo), both on
the rows our pipeline makes, in order, with one JSON of timings each."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import DataConfig, ModelConfig, Task
from orchestrator.data import encode_data, read_data
from orchestrator.data.batching import pack_examples
from orchestrator.model import load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
SEQ, MICRO, WARMUP, STEPS = 128, 2, 1, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """40 Alpaca rows of 5..60 words (some pack together, some pad a lot), 2 validation rows."""
    directory = tmp_path_factory.mktemp("alpaca")
    rng = random.Random(0)
    words = "the provider may terminate suspend or modify the service at any time without notice".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    for name, count in (("train", 40), ("validation", 2)):
        rows = [{"instruction": text(rng.randint(5, 15)), "input": text(rng.randint(0, 10)),
                 "output": text(rng.randint(5, 60))} for _ in range(count)]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return directory


def run_baseline(launcher: list, data_dir: Path, out: Path, *args: str) -> dict:
    tokenizer = resolve_model_path("minilm", what="tokenizer_config.json")
    command = [*launcher, str(ROOT / "bench" / "hf_baseline.py"), "--model", "builtin:tiny-llama",
               "--tokenizer", tokenizer, "--data", str(data_dir), "--seq", str(SEQ), "--micro-batch", str(MICRO),
               "--warmup", str(WARMUP), "--steps", str(STEPS), "--device", "cpu", "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a small CPU: no thread oversubscription
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def row_tokens(data_dir: Path, packed: bool) -> list:
    """Non-padding tokens of each row, made as the orchestrator makes them."""
    raw = read_data(DataConfig(path=str(data_dir), max_length=SEQ, cache=False), Task.causal_lm, seed=0)
    train = encode_data(raw, load_tokenizer(ModelConfig(path="minilm")), SEQ).train
    return [len(row.input_ids) for row in (pack_examples(train, SEQ) if packed else train)]


def test_lora_packed_one_process(data_dir, tmp_path):
    result = run_baseline([sys.executable], data_dir, tmp_path / "lora.json", "--mode", "lora", "--layout", "packed")
    assert result["world_size"] == 1 and result["mode"] == "lora" and result["layout"] == "packed"
    assert len(result["step_seconds"]) == WARMUP + STEPS and all(s > 0 for s in result["step_seconds"])
    assert result["tokens_per_s_per_gpu"] > 0 and result["max_allocated_gib"] is None
    assert 0 < result["n_params"]["trainable"] < result["n_params"]["total"]
    # the orchestrator's strategy=lora: PeftConfig's defaults, targets from peft's table for Llama
    assert result["lora"] == {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    lengths = row_tokens(data_dir, packed=True)
    assert result["step_tokens"] == [sum(lengths[i * MICRO: (i + 1) * MICRO]) for i in range(WARMUP + STEPS)]
    assert all(math.isfinite(loss) for loss in result["losses"]) and len(result["losses"]) == WARMUP + STEPS


def test_zero3_padded_two_processes(data_dir, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run_baseline(launcher, data_dir, tmp_path / "zero3.json", "--mode", "zero3", "--layout", "padded")
    assert result["world_size"] == 2 and result["built_partitioned"] is True
    assert result["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert result["n_params"]["trainable"] == result["n_params"]["total"] > 0
    assert len(result["losses"]) == WARMUP + STEPS and all(math.isfinite(x) for x in result["losses"])
    assert abs(result["losses"][0] - math.log(30522)) < 1.0  # random init: about ln(vocab), the global mean
    # rows in order: each step's 2 ranks x 2 rows are the next 4 rows, tokens summed over both ranks
    lengths = row_tokens(data_dir, packed=False)
    per_step = 2 * MICRO
    assert result["step_tokens"] == [sum(lengths[i * per_step: (i + 1) * per_step]) for i in range(WARMUP + STEPS)]
    timed = result["step_tokens"][WARMUP:]
    expected = sum(timed) / sum(result["step_seconds"][WARMUP:]) / 2
    assert result["tokens_per_s_per_gpu"] == pytest.approx(expected) and result["command_to_first_step_s"] > 0


def test_lora_grad_accum_counts_whole_optimizer_steps(data_dir, tmp_path):
    """--grad-accum 2: each optimizer step is two micro-batches; tokens and losses are per optimizer step."""
    result = run_baseline([sys.executable], data_dir, tmp_path / "acc.json", "--mode", "lora", "--layout", "packed",
                          "--grad-accum", "2")
    assert result["grad_accum"] == 2 and len(result["step_seconds"]) == WARMUP + STEPS
    lengths = row_tokens(data_dir, packed=True)
    per_step = 2 * MICRO
    assert result["step_tokens"] == [sum(lengths[i * per_step: (i + 1) * per_step]) for i in range(WARMUP + STEPS)]
    # each micro-batch's loss is its share of the step's per-token loss: their sum is about ln(vocab) at init
    assert len(result["losses"]) == WARMUP + STEPS and abs(result["losses"][0] - math.log(30522)) < 1.0


def test_throughput_case_names():
    sys.path.insert(0, str(ROOT / "bench"))
    from throughput import parse_case

    assert parse_case("ours-8b-2gpu") == {"name": "ours-8b-2gpu", "system": "ours", "model": "8b", "gpus": 2}
    case = parse_case("trainer-1b-4gpu-mb2-acc4-r2")
    assert (case["micro_batch"], case["grad_accum"], case["repeat"], case["gpus"]) == (2, 4, 2, 4)
    assert parse_case("ours-1b-2gpu-mb1-acc8-auto")["auto_micro"] is True
    for bad in ("ours-1b-2gpu-x3", "ours-1b-gpu", "mine-1b-2gpu", "ours-1b-2gpu-mb", "trainer-1b-2gpu-auto"):
        with pytest.raises(SystemExit):
            parse_case(bad)
