"""Issue 18: how long a checkpoint stalls training, phase by phase, written synchronously and in the background.

Each case is one run of the product (`python -m orchestrator`, Ray Train, DeepSpeed ZeRO-3 full fine-tuning) of a
Llama-shaped model built from its config with random weights, on packed rows of the bundled legal instructions:
  none   trainer.checkpoint_every=0: the steps alone, the baseline of the overhead
  sync   trainer.async_checkpoint=false: DeepSpeed writes the shards, then the checksums, the marker and
         ray.train.report's copy into the run's storage, all while training waits (the behaviour before issue 18)
  async  the default: the shards are copied into host memory while training waits; writing them, the checksums, the
         marker and the report happen on a background thread while training goes on
The final checkpoint is skipped (trainer.save_final=false): it is written in the training loop either way.

Figures per case, from the run's metrics.json (rank 0; orchestrator/checkpoint_writer.py times every checkpoint):
  blocked     seconds the training loop spent in each checkpoint (waiting for the previous one included)
  complete    seconds from the start of a checkpoint until it is in storage and reported (its marker written)
  save/write/checksum/publish   the phases: save_checkpoint (writing the shards, or staging them), the staged
              shards written (background), the checksums and marker, ray.train.report (Ray's copy into storage)
  overhead    (training loop seconds of the case - of `none`) / checkpoints: what a checkpoint costs the run, the
              background's slowing of the steps beside it included; and that cost as a share of the wall time of
              --project-every steps (the default trainer.checkpoint_every=100 of the recipes) at `none`'s step time

One worker runs in the driver's process by default (cluster.in_process=auto), where publishing is a rename into the
run's storage; the extra override cluster.in_process=false puts it on a Ray Train worker, where publishing is
ray.train.report's copy (as for every run of several workers).

  CPU:  python bench/checkpoint_stall.py --device cpu --model 200m --steps 20 --every 5 --seq 128 \
            --cases none,sync,async,sync,async cluster.in_process=false
  GPU:  python bench/checkpoint_stall.py --device cuda --gpus 1 --model 1b --steps 40 --every 10 --seq 2048 \
            --cases none,sync,async,sync,async cluster.in_process=false
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Llama shapes: the builtin configs, or a config's shape overridden (model.config_overrides)
MODELS: Dict[str, Dict[str, Any]] = {
    "tiny": {"path": "builtin:tiny-llama", "overrides": {}},
    "200m": {"path": "builtin:tiny-llama", "overrides": {  # ~201M parameters, 2.4 GB of ZeRO-3 optimizer shards
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": 32000}},
    "1b": {"path": "builtin:llama-3.2-1b", "overrides": {}},
    "8b": {"path": "builtin:llama-3.1-8b", "overrides": {}},
}
CASES = ("none", "sync", "async")


def tokenizer_dir(args) -> str:
    """--tokenizer, else the bundled MiniLM tokenizer, else (a GPU image without it) a BPE tokenizer trained here on
    the sample text (tests/gpu/support.py): every model here has a vocabulary at least as large."""
    if args.tokenizer:
        return args.tokenizer
    try:
        from orchestrator.model import resolve_model_path

        return resolve_model_path("minilm", what="tokenizer_config.json")
    except Exception:  # noqa: BLE001 - the package is not installed
        from tests.gpu.support import build_tokenizer

        return str(build_tokenizer(Path(args.scratch) / "tokenizer"))


def overrides_for(case: str, args, tokenizer: str, run_dir: Path) -> List[str]:
    model = MODELS[args.model]
    common = ["model=tiny_llama", f"model.path={model['path']}", f"model.tokenizer_path={tokenizer}",
              "data=legal_instructions", "data.packing=true", f"data.max_length={args.seq}",
              "data.max_validation_rows=2", "strategy=full", f"trainer.micro_batch_size={args.micro_batch}",
              f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "trainer.eval_generate_rows=0",
              "trainer.select_best=false", "trainer.save_final=false", "logger.mode=disabled",
              f"trainer.checkpoint_every={0 if case == 'none' else args.every}",
              f"trainer.async_checkpoint={'true' if case == 'async' else 'false'}", f"hydra.run.dir={run_dir}"]
    common += [f"+model.config_overrides.{key}={value}" for key, value in model["overrides"].items()]
    if args.device == "cpu":
        common += ["cluster.gpus=0", f"cluster.cpu_workers={args.workers}"]
    return common + list(args.extra)


def run_case(case: str, index: int, args, tokenizer: str) -> Dict[str, Any]:
    run_dir = Path(args.scratch) / f"{args.tag}_{index}_{case}"
    log = Path(args.out) / f"{args.tag}_{index}_{case}.log"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(args.gpus))
    command = [sys.executable, "-m", "orchestrator", *overrides_for(case, args, tokenizer, run_dir)]
    started = time.time()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return {"case": case, "error": f"exit {code}, see {log}"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = metrics["train/step_s_history"]
    row = {"case": case, "wall_s": time.time() - started, "step_s_median": statistics.median(steps),
           "step_seconds": steps, "loop_s": metrics.get("time/train_s", 0.0) + metrics.get("time/checkpoint_s", 0.0),
           "losses": metrics["train/loss_history"], "load_average": os.getloadavg()[0]}
    for key, value in metrics.items():
        if key.startswith("checkpoint/"):
            row[key.split("/", 1)[1]] = value
    stored = [d for d in (run_dir / "checkpoints").rglob("checkpoint_*") if d.is_dir()]
    if stored:  # the largest checkpoint in storage (the newest is the final report's metrics)
        row["checkpoint_gib"] = max(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in stored) / 2**30
    if not args.keep_checkpoints:  # measured: the next case needs the disk (keep_checkpoints of them each)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return row


def slowdown(row: Dict[str, Any]) -> Dict[str, Any]:
    """Within the run: the steps that ran while a checkpoint was still being written in the background (from the
    end of its blocked part for complete - blocked seconds), and how much longer they took than the run's other
    steps (their median; the first step, a warm-up, left out)."""
    steps = row["step_seconds"]
    overlapped = set()
    for blocked, complete, at in zip(row.get("blocked_s", []), row.get("complete_s", []), row.get("steps", [])):
        left, index = complete - blocked, at  # steps[at] is the first step after the checkpoint of step `at`
        while left > 0 and index < len(steps):
            overlapped.add(index)
            left -= steps[index]
            index += 1
    others = [s for i, s in enumerate(steps) if i and i not in overlapped]
    typical = statistics.median(others) if others else float("nan")
    extra = sum(steps[i] - typical for i in overlapped)
    count = len(row.get("blocked_s", []))
    return {"typical_step_s": typical, "overlapped_steps": len(overlapped),
            "slowdown_per_checkpoint_s": extra / count if count else 0.0}


def summarise(rows: List[Dict[str, Any]], project_every: int) -> None:
    baseline = next((r for r in rows if r["case"] == "none" and "error" not in r), None)
    for row in rows:
        count = len(row.get("blocked_s", []))
        if not count or "error" in row:
            continue
        row.update(slowdown(row))
        # what a checkpoint costs the run: the loop's wait, and the steps beside the background write slowed
        row["cost_per_checkpoint_s"] = mean(row["blocked_s"]) + row["slowdown_per_checkpoint_s"]
        row["cost_at_every"] = row["cost_per_checkpoint_s"] / (project_every * row["typical_step_s"])
        if baseline is not None:  # the same from the whole loop's time against the run without checkpoints
            row["loop_overhead_per_checkpoint_s"] = (row["loop_s"] - baseline["loop_s"]) / count
            row["same_losses_as_none"] = row["losses"] == baseline["losses"]


def mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def print_table(rows: List[Dict[str, Any]], project_every: int) -> None:
    def f(value, spec=".2f"):
        return "" if value is None or value != value else format(value, spec)

    print(f"| case | checkpoint GiB | blocked s: first, later (mean) | of which waiting for the previous | "
          f"complete s (mean) | save | write | checksum | publish | step s | steps slowed, s per checkpoint | "
          f"cost s per checkpoint | share of {project_every} steps | loop s vs none, per checkpoint | losses = none |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | failed: {r['error']} |")
            continue
        blocked = r.get("blocked_s", [])
        if not blocked:
            print(f"| {r['case']} | | | | | | | | | {f(r['step_s_median'])} | | | | | |")
            continue
        print(f"| {r['case']} | {f(r.get('checkpoint_gib'))} | {f(blocked[0])}, {f(mean(blocked[1:]))} | "
              f"{f(sum(r.get('wait_s', [])))} | {f(mean(r.get('complete_s', [])))} | {f(mean(r.get('save_s', [])))} | "
              f"{f(mean(r.get('write_s', [])))} | "
              f"{f(mean(r.get('checksum_s', [])))} | {f(mean(r.get('publish_s', [])))} | {f(r['typical_step_s'])} | "
              f"{r['overlapped_steps']}, {f(r['slowdown_per_checkpoint_s'])} | {f(r['cost_per_checkpoint_s'])} | "
              f"{f(r['cost_at_every'], '.2%')} | {f(r.get('loop_overhead_per_checkpoint_s'))} | "
              f"{r.get('same_losses_as_none', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="200m", choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="CPU workers (--device cpu)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="trainer.checkpoint_every of the sync/async cases")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES), help="in this order; a case may repeat")
    parser.add_argument("--project-every", type=int, default=100)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--keep-checkpoints", action="store_true", help="leave each case's checkpoints on disk")
    parser.add_argument("--scratch", default="/var/tmp/checkpoint_stall")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "issue18"))
    parser.add_argument("--tag", default=None, help="name of the results file (default: <model>_<device>)")
    parser.add_argument("extra", nargs="*", help="more overrides for every case")
    args = parser.parse_args()
    args.tag = args.tag or f"{args.model}_{args.device}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_dir(args)
    rows = []
    cases = args.cases.split(",")
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"unknown case {case}: one of {', '.join(CASES)}")
    for index, case in enumerate(cases):
        row = run_case(case, index, args, tokenizer)
        rows.append(row)
        summarise(rows, args.project_every)
        print(f"{case}: " + (row["error"] if "error" in row else
                             f"blocked {row.get('blocked_s', [])} s, complete {row.get('complete_s', [])} s, "
                             f"load average {row['load_average']:.1f}, "
                             f"{row['wall_s']:.0f} s in all"), flush=True)
        report = {"command": " ".join(sys.argv), "machine": machine(args.device), "rows": rows,
                  "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (Path(args.out) / f"{args.tag}.json").write_text(json.dumps(report, indent=1))
    print_table(rows, args.project_every)


def machine(device: str) -> str:
    import psutil

    text = f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    if device == "cuda":
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30).stdout.strip().splitlines()
            text += f", {len(gpus)} x {gpus[0]}" if gpus else ""
        except Exception:  # noqa: BLE001
            pass
    return text


if __name__ == "__main__":
    main()
