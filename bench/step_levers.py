"""Levers on one GPU, before/after in one process: attention kernel for packed rows, and Liger's fused kernels.

The model (Llama-3.2-1B shape by default, random bf16 weights) runs forward + backward on packed rows of --seq
tokens (examples of log-normally spread lengths, median ~600 tokens, position ids restarting per example, no
attention across examples), --micro-batch rows at a time, no optimizer (what the levers change is the
forward/backward). Variants, each timed over --steps after --warmup (CUDA-synchronised):
  sdpa           transformers' SDPA with the block-diagonal mask it derives from the position ids (the default)
  flex           transformers' flex_attention: the same mask as a BlockMask, fully masked blocks skipped
  sdpa_causal    SDPA with one causal mask over the whole row (attends across examples: WRONG for training,
                 shown only as the ceiling that a variable-length FlashAttention kernel would approach)
and then, after Liger's patches (process-wide, so they come last): liger (RMSNorm/SwiGLU/RoPE) and
liger_flce (+ the output projection fused with the loss, orchestrator/kernels.py), each with sdpa and flex.
Every variant's loss on the first batch is printed beside the reference's (sdpa): a lever that changes
the loss beyond bf16 noise is wrong, not fast.

Usage: python3 bench/step_levers.py --out $OUT [--model builtin:llama-3.2-1b --seq 4096 --micro-batch 2]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def packed_batch(micro: int, seq: int, vocab: int, seed: int):
    import torch

    rng = random.Random(seed)
    positions = []
    for _ in range(micro):
        row = []
        while len(row) < seq:
            length = min(seq - len(row), max(16, int(rng.lognormvariate(math.log(600), 0.9))))
            row += list(range(length))
        positions.append(row)
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (micro, seq), generator=generator),
            "position_ids": torch.tensor(positions)}


def time_variant(name, model_path, attention, fused_loss, batches, args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator import kernels
    from orchestrator.losses import loss_terms
    from orchestrator.model import resolve_model_path

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_model_path(model_path))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention)
    if fused_loss:
        kernels.attach_fused_loss(model)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times, first_loss = [], None
    for i in range(args.warmup + args.steps):
        batch = {k: v.cuda() for k, v in batches[i % len(batches)].items()}
        labels = batch["input_ids"].clone()
        torch.cuda.synchronize()
        started = time.perf_counter()
        if fused_loss:
            loss = model(**batch, use_cache=False, labels=labels)
        else:
            loss, _ = loss_terms(model(**batch, use_cache=False).logits, labels, _causal())
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        if i == 0:
            first_loss = loss.item() / (labels[:, 1:].numel())
        model.zero_grad(set_to_none=True)
    step_s = sum(times[args.warmup:]) / args.steps
    result = {"variant": name, "attention": attention, "fused_loss": fused_loss, "step_s": step_s,
              "tokens_per_s": args.micro_batch * args.seq / step_s, "first_loss_per_token": first_loss,
              "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_s": times[0]}
    del model
    torch.cuda.empty_cache()
    return result


def _causal():
    from orchestrator.config import Task

    return Task.causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="builtin:llama-3.2-1b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="sdpa,flex,sdpa_causal,liger_sdpa,liger_flex,liger_flce_sdpa,"
                                              "liger_flce_flex")
    args = parser.parse_args()
    import torch

    from orchestrator import kernels
    from orchestrator.config import ModelConfig
    from orchestrator.model import read_model_config

    model_config = read_model_config(ModelConfig(path=args.model))
    batches = [packed_batch(args.micro_batch, args.seq, model_config["vocab_size"], seed) for seed in range(4)]
    causal_batches = [{"input_ids": b["input_ids"],
                       "position_ids": torch.arange(args.seq).repeat(args.micro_batch, 1)} for b in batches]
    rows, patched = [], False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        if name.startswith("liger") and not patched:
            kernels.patch_model_classes(model_config["model_type"])
            patched = True
        attention = "flex_attention" if name.endswith("flex") else "sdpa"
        try:
            row = time_variant(name, args.model, attention, "flce" in name,
                               causal_batches if name == "sdpa_causal" else batches, args)
        except Exception as err:  # noqa: BLE001  (one failed lever must not lose the others' figures)
            row = {"variant": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "step_levers.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    reference = next((r for r in rows if r.get("variant") == "sdpa"), None)
    print("| variant | tokens/s | vs sdpa | step s | first-step s | max alloc GiB | first loss | loss vs sdpa |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} |")
            continue
        ok = reference is not None and "tokens_per_s" in reference
        ratio = r["tokens_per_s"] / reference["tokens_per_s"] if ok else float("nan")
        diff = (abs(r["first_loss_per_token"] - reference["first_loss_per_token"]) / reference["first_loss_per_token"]
                if ok else float("nan"))
        print(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {ratio:.3f} | {r['step_s']:.3f} | "
              f"{r['first_step_s']:.1f} | {r['max_allocated_gib']:.1f} | {r['first_loss_per_token']:.4f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
