"""Predicted (planner) against measured peak GPU memory, for the planner's estimate in orchestrator/memory.py.

Cases (Llama shapes built from config, random weights, no download; rows of exactly data.max_length tokens):
  full-1b-2gpu   Llama-3.2-1B shape, full ZeRO-3 on 2 GPUs, through `python -m orchestrator` (Ray Train)
  lora-8b-1gpu   Llama-3.1-8B shape, LoRA on 1 GPU, through `python -m orchestrator` (Ray Train)
  qlora-8b-1gpu  Llama-3.1-8B shape, QLoRA on 1 GPU: the same build/adapter/engine code, in-process without
                 Ray (the GPU image cannot carry both Ray and bitsandbytes)
Measured: torch.cuda.max_memory_allocated and max_memory_reserved (largest over ranks).

Usage: python bench/memory.py --tokenizer DIR --out DIR [--cases full-1b-2gpu,lora-8b-1gpu,qlora-8b-1gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQ = 2048


def make_long_rows(directory: Path, rows: int = 48) -> Path:
    """Alpaca rows whose response runs past SEQ tokens, so every row is truncated to exactly SEQ."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ("the provider may terminate suspend or modify the service at any time without notice and shall "
             "not be liable for any loss arising from such termination ").split()
    for name, count in (("train", rows), ("validation", 2)):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for i in range(count):
                text = " ".join(words[(i + j) % len(words)] for j in range(SEQ * 2))
                handle.write(json.dumps({"instruction": "Summarise the clause.", "input": "", "output": text}) + "\n")
    return directory


def save_random_8b(directory: Path, tokenizer: str) -> Path:
    """Llama-3.1-8B shape with random bf16 weights, saved as safetensors (QLoRA quantises on load)."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from orchestrator.model import resolve_model_path

    config = LlamaConfig.from_pretrained(resolve_model_path("builtin:llama-3.1-8b"))
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def run_cli(name: str, overrides: list, out: Path, visible: str) -> dict:
    run_dir = Path("/tmp/bench_runs") / name
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "orchestrator", *overrides, "logger.mode=disabled",
                        "trainer.max_steps=4", "data.max_validation_rows=2", f"data.max_length={SEQ}",
                        f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    return {"case": name, "strategy": plan["strategy"], "gpus": plan["num_workers"],
            "checkpointing": plan["gradient_checkpointing"], "predicted_gib": plan["predicted_gib_per_gpu"],
            "allocated_gib": metrics["gpu/max_allocated_gib"], "reserved_gib": metrics["gpu/max_reserved_gib"],
            "wall_s": time.perf_counter() - started}


def run_qlora_in_process(model_dir: Path, data_dir: Path) -> dict:
    """The QLoRA step as the train loop does it for a one-GPU adapter plan (PlainEngine), minus Ray."""
    import torch

    from orchestrator.adapters import apply_adapter
    from orchestrator.config import DataConfig, Init, ModelConfig, PeftConfig, RunConfig, Task, TrainerConfig
    from orchestrator.data import encode_data, read_data
    from orchestrator.data.batching import collate
    from orchestrator.losses import loss_terms
    from orchestrator.memory import ModelShape, estimate
    from orchestrator.model import build_model, load_tokenizer, read_model_config
    from orchestrator.optimization import make_optimizer, make_scheduler
    from orchestrator.plain_engine import PlainEngine

    model_cfg = ModelConfig(path=str(model_dir), task=Task.causal_lm, init=Init.pretrained)
    run = RunConfig(model=model_cfg, data=DataConfig(path=str(data_dir), max_length=SEQ),
                    trainer=TrainerConfig(max_steps=4, micro_batch_size=1))
    shape = ModelShape.from_config(read_model_config(model_cfg))
    checkpointing = False
    predicted = estimate("qlora", shape, 1, SEQ, checkpointing, run.peft.rank)
    tokenizer = load_tokenizer(model_cfg)
    data = encode_data(read_data(run.data, Task.causal_lm, 0), tokenizer, SEQ)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)  # the allocator's statistics exist once the device's context does
    torch.cuda.reset_peak_memory_stats(device)
    model = build_model(model_cfg, None, torch.bfloat16, "qlora", checkpointing, device=device)
    model = apply_adapter(model, "qlora", PeftConfig(), Task.causal_lm)
    optimizer = make_optimizer(model, run, device, paged=True)
    engine = PlainEngine(model, optimizer, make_scheduler(optimizer, run), 1, 1.0, torch.bfloat16, device)
    for step in range(4):
        batch = {k: v.to(device) for k, v in collate([data.train[step]], tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")
        loss, weight = loss_terms(engine(**batch).logits, labels, Task.causal_lm)
        engine.backward(loss / weight)
        engine.step()
    return {"case": "qlora-8b-1gpu", "strategy": "qlora", "gpus": 1, "checkpointing": checkpointing,
            "predicted_gib": round(predicted.gib, 2), "allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30, "wall_s": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="full-1b-2gpu,lora-8b-1gpu")
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the Ray workers get it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_long_rows(Path("/tmp/bench_long_rows"))
    common = ["model=tiny_llama", "data=legal_instructions", f"data.path={data}",
              f"model.tokenizer_path={args.tokenizer}"]
    rows = []
    for case in args.cases.split(","):
        try:
            if case == "full-1b-2gpu":
                rows.append(run_cli(case, [*common, "model.path=builtin:llama-3.2-1b", "strategy=full",
                                           "trainer.micro_batch_size=2"], out, "0,1"))
            elif case == "lora-8b-1gpu":
                model = save_random_8b(Path("/tmp/llama8b"), args.tokenizer)
                rows.append(run_cli(case, [*common, f"model.path={model}", "model.init=pretrained",
                                           "model.tokenizer_path=null", "strategy=lora",
                                           "trainer.micro_batch_size=1"], out, "0"))
            elif case == "qlora-8b-1gpu":
                rows.append(run_qlora_in_process(save_random_8b(Path("/tmp/llama8b"), args.tokenizer), data))
        except Exception as err:  # one failed case must not lose the others' figures
            import traceback

            (out / f"{case}.traceback.txt").write_text(traceback.format_exc())
            rows.append({"case": case, "error": f"{type(err).__name__}: {err}"})
        (out / "memory.json").write_text(json.dumps(rows, indent=1))
    print("| case | strategy | GPUs | act. ckpt | predicted GiB/GPU | max allocated GiB | max reserved GiB | "
          "error vs reserved |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | failed: {r['error'][:200]} |")
            continue
        error = (r["predicted_gib"] - r["reserved_gib"]) / r["reserved_gib"]
        print(f"| {r['case']} | {r['strategy']} | {r['gpus']} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['predicted_gib']:.1f} | {r['allocated_gib']:.1f} | {r['reserved_gib']:.1f} | {error:+.0%} |")


if __name__ == "__main__":
    main()
