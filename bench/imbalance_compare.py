"""Issue 13: which classification recipe generalises to unseen clauses? Variants x seeds, in one process.

Every variant trains the bundled MiniLM as bench/plain_loop.py does (same model, tokenization, AdamW, fp32) but
on train minus a held-out carve-out (data.validation_fraction of the rows, stratified by label, seeded), as the
CLI does with a single train file. Selection (best epoch, the logit-adjustment strength) uses the carve-out
only; the quoted score is on --eval, which neither training nor selection saw.

Options compared (several seeds each):
  weighting   none | sqrt (sqrt(n/(k n_c))) | balanced (n/(k n_c)) cross-entropy weights; or balanced sampling
  selection   the last epoch, or the epoch with the best carve-out macro-F1
  adjustment  post-hoc logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment"):
              logits - tau * log(prior), tau picked on the carve-out from a small grid (0 = off)

  python bench/imbalance_compare.py --train ../shared/data/unfair_tos/train.jsonl \
      --eval ../shared/data/unfair_tos/validation.jsonl --seeds 0 1 2 --out bench/results/imbalance.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from plain_loop import encode, read_rows, seed_everything  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from orchestrator.model import BUNDLED_MINILM, resolve_model_path  # noqa: E402

TAUS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]

# name: (weighting, balanced sampling, lr, epochs, schedule, warmup ratio, grad clip[, LoRA])
# LoRA: {"rank", "alpha", "targets" (None: peft's table for BERT: query, value), "bf16"} through the product's
# orchestrator.adapters.apply_adapter; "bf16" loads the frozen base in bf16 and runs under bf16 autocast, as the
# planner's one-GPU LoRA plan does (plain_engine.PlainEngine).
LORA_ALL = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _lora(lr: float, epochs: int, targets, bf16: bool) -> tuple:
    """A LoRA r16 (alpha 32) variant with balanced weights, warmup 0.1 + linear decay and clipping at 1."""
    return ("balanced", False, lr, epochs, "linear", 0.1, 1.0,
            {"rank": 16, "alpha": 32, "targets": targets, "bf16": bf16})


VARIANTS = {
    "sqrt, lr 1e-4 const, 4 ep": ("sqrt", False, 1e-4, 4, "constant", 0.0, 0.0),
    "none, lr 1e-4 const, 4 ep": ("none", False, 1e-4, 4, "constant", 0.0, 0.0),
    "balanced, lr 1e-4 const, 4 ep": ("balanced", False, 1e-4, 4, "constant", 0.0, 0.0),
    "sampling, lr 1e-4 const, 4 ep": ("none", True, 1e-4, 4, "constant", 0.0, 0.0),
    "sqrt, lr 1e-4 cosine w0.1 clip1, 4 ep": ("sqrt", False, 1e-4, 4, "cosine", 0.1, 1.0),
    "sqrt, lr 1e-4 linear w0.1, 6 ep": ("sqrt", False, 1e-4, 6, "linear", 0.1, 0.0),
    "sqrt, lr 5e-5 const, 6 ep": ("sqrt", False, 5e-5, 6, "constant", 0.0, 0.0),
    "sqrt, lr 2e-4 const, 4 ep": ("sqrt", False, 2e-4, 4, "constant", 0.0, 0.0),
    "balanced, lr 5e-5 const, 5 ep": ("balanced", False, 5e-5, 5, "constant", 0.0, 0.0),
    "balanced, lr 5e-5 linear w0.1, 5 ep": ("balanced", False, 5e-5, 5, "linear", 0.1, 0.0),
    "balanced, lr 5e-5 cosine w0.1 clip1, 5 ep": ("balanced", False, 5e-5, 5, "cosine", 0.1, 1.0),
    "balanced, lr 1e-4 cosine w0.1 clip1, 4 ep": ("balanced", False, 1e-4, 4, "cosine", 0.1, 1.0),
    "balanced, lr 5e-5 linear w0.1 clip1, 5 ep": ("balanced", False, 5e-5, 5, "linear", 0.1, 1.0),
    "balanced, lr 5e-5 linear w0.1, 4 ep": ("balanced", False, 5e-5, 4, "linear", 0.1, 0.0),
    "balanced, lr 5e-5 linear w0.1 clip1, 4 ep": ("balanced", False, 5e-5, 4, "linear", 0.1, 1.0),
    "balanced, lr 1e-4 linear w0.1 clip1, 5 ep": ("balanced", False, 1e-4, 5, "linear", 0.1, 1.0),
    "balanced, lr 1e-4 linear w0.1 clip1, 6 ep": ("balanced", False, 1e-4, 6, "linear", 0.1, 1.0),
}
for _lr, _epochs, _targets, _bf16 in [(5e-4, 5, None, True), (5e-4, 5, None, False), (2e-3, 5, None, False),
                                      (1e-3, 5, LORA_ALL, False), (1e-3, 5, LORA_ALL, True),
                                      (2e-3, 10, LORA_ALL, False), (2e-3, 5, None, True), (4e-3, 5, None, True)]:
    VARIANTS[f"lora r16 {'all' if _targets else 'qv'} {'bf16' if _bf16 else 'fp32'}, lr {_lr:g}, {_epochs} ep"] = \
        _lora(_lr, _epochs, _targets, _bf16)


def stratified_carve_out(golds: list, fraction: float, seed: int) -> tuple:
    rng = random.Random(seed)
    train, held = [], []
    for c in sorted(set(golds)):
        rows = [i for i, g in enumerate(golds) if g == c]
        rng.shuffle(rows)
        k = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
        held += rows[:k]
        train += rows[k:]
    return sorted(train), sorted(held)


@torch.no_grad()
def logits_of(model, tokenizer, texts, max_length, device) -> torch.Tensor:
    model.eval()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if next(model.parameters()).dtype == torch.bfloat16
                else contextlib.nullcontext())
    with autocast:
        out = [model(**encode(tokenizer, texts[s: s + 64], max_length, device)).logits.float().cpu()
               for s in range(0, len(texts), 64)]
    model.train()
    return torch.cat(out)


def macro_f1(golds, logits) -> float:
    return float(f1_score(golds, logits.argmax(-1).tolist(), average="macro", zero_division=0))


def train_variant(spec, seed, rows, eval_rows, labels, args, device) -> dict:
    weighting, sampling, lr, epochs, schedule, warmup, clip = spec[:7]
    lora = spec[7] if len(spec) > 7 else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if lora and lora["bf16"]
                else contextlib.nullcontext())
    texts, golds = [t for t, _ in rows], [labels.index(lb) for _, lb in rows]
    train_idx, held_idx = stratified_carve_out(golds, 0.1, seed)
    k = len(labels)
    counts = Counter(golds[i] for i in train_idx)
    n = len(train_idx)
    balanced = torch.tensor([n / (k * max(1, counts[c])) for c in range(k)])
    weights = {"none": None, "sqrt": balanced.sqrt(), "balanced": balanced}[weighting]
    prior = torch.tensor([max(1, counts[c]) / n for c in range(k)])
    seed_everything(seed)
    model_dir = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if lora and lora["bf16"] else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=k, dtype=dtype,
                                                               use_safetensors=True).to(device)
    if lora:
        from orchestrator.adapters import apply_adapter
        from orchestrator.config import PeftConfig, Strategy, Task

        model = apply_adapter(model, Strategy.lora, PeftConfig(rank=lora["rank"], alpha=lora["alpha"],
                                                               target_modules=lora["targets"]), Task.classification)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * epochs
    warm = int(warmup * total)

    def factor(step):
        if step < warm:
            return step / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    w_rows = 1.0 / torch.tensor([counts[golds[i]] for i in train_idx], dtype=torch.float64)
    held_texts, held_golds = [texts[i] for i in held_idx], [golds[i] for i in held_idx]
    eval_texts, eval_golds = [t for t, _ in eval_rows], [labels.index(lb) for _, lb in eval_rows]
    per_epoch = []
    for epoch in range(epochs):
        if sampling:
            order = [train_idx[i] for i in torch.multinomial(w_rows, n, True, generator=generator).tolist()]
        else:
            order = [train_idx[i] for i in torch.randperm(n, generator=generator).tolist()]
        for s in range(0, n, args.batch_size):
            index = order[s: s + args.batch_size]
            with autocast:
                logits = model(**encode(tokenizer, [texts[i] for i in index], args.max_length, device)).logits.float()
            target = torch.tensor([golds[i] for i in index], device=device)
            loss = F.cross_entropy(logits, target, weight=weights.to(device) if weights is not None else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
        held_logits = logits_of(model, tokenizer, held_texts, args.max_length, device)
        eval_logits = logits_of(model, tokenizer, eval_texts, args.max_length, device)
        per_epoch.append((held_logits, eval_logits))
    log_prior = prior.log()
    best_epoch = max(range(epochs), key=lambda e: macro_f1(held_golds, per_epoch[e][0]))
    out = {}
    for selection, epoch in (("last", epochs - 1), ("best", best_epoch)):
        held_logits, eval_logits = per_epoch[epoch]
        tau = max(TAUS, key=lambda t: (macro_f1(held_golds, held_logits - t * log_prior), -abs(t)))
        out[f"{selection}"] = macro_f1(eval_golds, eval_logits)
        out[f"{selection}+adjust"] = macro_f1(eval_golds, eval_logits - tau * log_prior)
        out[f"{selection}+adjust tau"] = tau
    out["best epoch"] = best_epoch + 1
    # the carve-out's own figures: what a variant is chosen by (validation.jsonl only reports)
    out["carve_out last"] = macro_f1(held_golds, per_epoch[-1][0])
    out["carve_out best"] = macro_f1(held_golds, per_epoch[best_epoch][0])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="*", default=None, help="names from VARIANTS (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model", default=BUNDLED_MINILM, help="a directory with the MiniLM weights where the package is "
                   "not installed")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows, eval_rows = read_rows(args.train), read_rows(args.eval)
    labels = sorted({lb for _, lb in rows})
    results = []
    for name in args.variants or list(VARIANTS):
        for seed in args.seeds:
            started = time.perf_counter()
            scores = train_variant(VARIANTS[name], seed, rows, eval_rows, labels, args, device)
            results.append({"variant": name, "seed": seed, **scores, "seconds": time.perf_counter() - started})
            print(json.dumps(results[-1]), flush=True)
            Path(args.out).write_text(json.dumps({"device": str(device), "results": results}, indent=1))
    print("\n| variant | " + " | ".join(["last", "best", "last+adjust", "best+adjust"]) + " |")
    print("| --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(r["variant"] for r in results):
        cells = []
        for key in ("last", "best", "last+adjust", "best+adjust"):
            values = [r[key] for r in results if r["variant"] == name]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
