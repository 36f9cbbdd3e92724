"""Training throughput: our orchestrator against Hugging Face Trainer, side by side in one call.

Cases, named <system>-<model>-<gpus>gpu and run in the order given (results rewritten after each case, so a
timeout keeps what ran):
  ours          `python -m orchestrator` strategy=full (Ray Train + DeepSpeed ZeRO-3), the product's defaults
                (fused kernels where the planner turns them on), on the first <gpus> GPUs
  oursplain     the same with model.fused_kernels=off: the lever measured before/after
  oursflex      the same with model.attn_implementation=flex_attention (packed rows: masked blocks skipped)
  trainer       HF Trainer + DeepSpeed ZeRO-3 under torchrun (bench/hf_baseline.py --mode zero3); if it runs
                out of memory, once more with gradient checkpointing, as a user would (and said so)
  ourslora      `python -m orchestrator` strategy=lora on one GPU
  trainerlora   HF Trainer + peft on one GPU (bench/hf_baseline.py --mode lora)
Models: 1b = Llama-3.2-1B shape, 8b = Llama-3.1-8B shape, built from config with random weights (no download).

Data: the same synthetic instruction rows for every case (Alpaca JSONL, responses of log-normally spread
lengths, median ~600 tokens), tokenized by our pipeline and packed into rows of --seq tokens (data.packing:
position ids restart per example, no attention across examples); both systems get the very same packed rows.

Figures per case, from the timed steps (after --warmup):
  tokens/s/GPU  non-padding tokens of the timed steps / their wall time / GPUs
  MFU           tokens/s/GPU x (6·N + 12·layers·hidden·seq) / bf16 matmul peak measured in this call (the slowest
                GPU's); N = parameters (tied embedding counted once); for LoRA 4·N instead of 6·N (the frozen
                weights get no weight gradients; the backward still computes the input gradients)
  memory        max allocated / reserved GiB, largest over ranks
  cmd→first     Popen of the command to the first training step
  scaling       tokens/s/GPU at n GPUs / tokens/s/GPU at 1 GPU (same system and model)

Usage (GPU):  python3 bench/throughput.py --tokenizer DIR --out $OUT --cases ours-1b-1gpu,ours-1b-4gpu,...
      (CPU):  python bench/throughput.py --device cpu --tokenizer DIR --out /tmp/tp --seq 128 --micro-batch 1 \
                  --cases ours-tiny-2gpu,trainer-tiny-2gpu,ourslora-tiny-1gpu,trainerlora-tiny-1gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ray_overhead import matmul_peak, versions  # noqa: E402  (the same peak and version report)

MODELS = {"1b": "builtin:llama-3.2-1b", "8b": "builtin:llama-3.1-8b", "tiny": "builtin:tiny-llama"}
SYSTEMS = ("ours", "oursplain", "oursflex", "trainer", "ourslora", "trainerlora")
WORDS = ("the licensee shall indemnify and hold harmless the licensor from any claim arising out of use of the "
         "software in breach of this agreement including reasonable attorney fees court costs and damages "
         "awarded by a competent tribunal within the jurisdiction agreed by the parties").split()


def make_rows(directory: Path, rows: int, seed: int = 0) -> Path:
    """Alpaca rows with log-normally spread response lengths (a few to ~3,000 words)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, count in (("train", rows), ("validation", 4)):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(count):
                words = min(3000, max(8, int(rng.lognormvariate(math.log(500), 0.9))))
                text = " ".join(rng.choice(WORDS) for _ in range(words))
                handle.write(json.dumps({"instruction": "Summarise the obligations in this clause.", "input": "",
                                         "output": text}) + "\n")
    return directory


def parse_case(name: str) -> Dict[str, Any]:
    """<system>-<model>-<n>gpu, then optional parts: -mb<k> (micro-batch per GPU, else --micro-batch), -acc<k>
    (micro-batches per optimizer step, else 1), -auto (ours only: the same global batch, micro-batch left to the
    planner: trainer.micro_batch_size=null), -r<k> (a repeat of the case under another name)."""
    system, model, gpus, *options = name.split("-")
    case = {"name": name, "system": system, "model": model, "gpus": int(gpus[:-3]) if gpus[:-3].isdigit() else 0}
    for option in options:
        if option == "auto" and system.startswith("ours"):
            case["auto_micro"] = True
            continue
        key = next((k for k in ("mb", "acc", "r") if option.startswith(k) and option[len(k):].isdigit()), None)
        if key is None:
            case["gpus"] = 0  # marks the name as bad
            break
        case[{"mb": "micro_batch", "acc": "grad_accum", "r": "repeat"}[key]] = int(option[len(key):])
    if system not in SYSTEMS or model not in MODELS or not gpus.endswith("gpu") or not case["gpus"]:
        raise SystemExit(f"bad case {name}: <{'|'.join(SYSTEMS)}>-<{'|'.join(MODELS)}>-<n>gpu"
                         "[-mb<k>][-acc<k>][-auto][-r<k>]")
    return case


def run_ours(case: Dict[str, Any], args, data: Path, log: Path) -> Dict[str, Any]:
    """The product, through its CLI; figures from the run's metrics.json and plan.json."""
    run_dir = Path(args.scratch) / case["name"]
    lora = case["system"] == "ourslora"
    overrides = ["model=tiny_llama", f"model.path={MODELS[case['model']]}", f"model.tokenizer_path={args.tokenizer}",
                 "data=legal_instructions", f"data.path={data}", "data.packing=true", f"data.max_length={args.seq}",
                 "data.max_validation_rows=2", *batch_overrides(case, args),
                 f"trainer.max_steps={args.warmup + args.steps}", "trainer.eval_generate_rows=0",
                 "trainer.save_final=false", "logger.mode=disabled", f"strategy={'lora' if lora else 'full'}",
                 f"hydra.run.dir={run_dir}"]
    if case["system"] == "oursplain":
        overrides.append("model.fused_kernels=off")
    if case["system"] == "oursflex":
        overrides.append("model.attn_implementation=flex_attention")
    if args.device == "cpu":
        overrides += ["cluster.gpus=0", f"cluster.cpu_workers={case['gpus']}"]
    launched = time.time()
    proc = run_logged([sys.executable, "-m", "orchestrator", *overrides], log, env_for(case, args))
    if proc != 0:
        return {"error": f"exit {proc}, see {log.name}"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    timed = slice(args.warmup, None)
    seconds, tokens = metrics["train/step_s_history"][timed], metrics["train/tokens_history"][timed]
    return {"tokens_per_s_per_gpu": sum(tokens) / sum(seconds) / case["gpus"], "step_s": sum(seconds) / len(seconds),
            "max_allocated_gib": metrics.get("gpu/max_allocated_gib"),
            "max_reserved_gib": metrics.get("gpu/max_reserved_gib"),
            "command_to_first_step_s": metrics["time/first_step_at"] - launched,
            "losses": metrics["train/loss_history"], "fused_kernels": plan.get("fused_kernels"),
            "step_seconds": metrics["train/step_s_history"], "step_tokens": metrics["train/tokens_history"],
            "gradient_checkpointing": plan["gradient_checkpointing"], "strategy": plan["strategy"],
            "planned_layout": [plan["micro_batch_size"], plan["grad_accum"]]}


def run_trainer(case: Dict[str, Any], args, data: Path, log: Path) -> Dict[str, Any]:
    """HF Trainer (+ DeepSpeed ZeRO-3, or + peft on one GPU) on the same packed rows; once more with
    gradient checkpointing if it runs out of memory without."""
    lora = case["system"] == "trainerlora"
    result_file = Path(args.scratch) / f"{case['name']}.json"
    micro, accum = layout(case, args.micro_batch)
    base = ["bench/hf_baseline.py", "--mode", "lora" if lora else "zero3", "--model", MODELS[case["model"]],
            "--tokenizer", args.tokenizer, "--data", str(data), "--seq", str(args.seq),
            "--micro-batch", str(micro), "--grad-accum", str(accum),
            "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--layout", "packed", "--device", args.device, "--out", str(result_file)]
    for checkpointing in (False, True):
        launched = time.time()
        launcher = ([sys.executable] if lora else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case['gpus']}"])
        command = [*launcher, *base, "--launched-at", str(launched)] + (["--grad-ckpt"] if checkpointing else [])
        result_file.unlink(missing_ok=True)
        code = run_logged(command, log, env_for(case, args), append=checkpointing)
        if code == 0:
            result = json.loads(result_file.read_text())
            result["gradient_checkpointing"] = checkpointing
            return result
        if "out of memory" not in log.read_text(errors="replace").lower():
            break
    return {"error": f"exit {code}, see {log.name}"}


def layout(case: Dict[str, Any], default_micro: int, figures: Dict[str, Any] = None) -> tuple:
    """(micro-batch, accumulation) of a case: the planner's pick where a run reported one (-auto), else the
    case name's, else default_micro (the --micro-batch the case ran with) and no accumulation."""
    if figures and figures.get("planned_layout"):
        return tuple(figures["planned_layout"])
    return case.get("micro_batch", default_micro), case.get("grad_accum", 1)


def batch_overrides(case: Dict[str, Any], args) -> List[str]:
    """The case's batch layout, or (-auto) only its global batch, split by the planner."""
    micro, accum = layout(case, args.micro_batch)
    if case.get("auto_micro"):
        return ["trainer.micro_batch_size=null", f"trainer.global_batch_size={case['gpus'] * micro * accum}"]
    return [f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={accum}"]


def env_for(case: Dict[str, Any], args) -> Dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(case["gpus"]))
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as our Ray workers get it
    return env


def run_logged(command: List[str], log: Path, env: Dict[str, str], append: bool = False) -> int:
    with open(log, "a" if append else "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        return subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode


def model_flops_per_token(model: str, seq: int, lora: bool = False) -> Dict[str, float]:
    """6·N + 12·layers·hidden·seq, N from the shape (orchestrator/memory.py's count); LoRA: 4·N (forward, and the
    backward's input gradients; the frozen weights get no weight gradients; the adapters' own work is < 1%)."""
    from orchestrator.config import ModelConfig
    from orchestrator.memory import ModelShape
    from orchestrator.model import read_model_config

    config = read_model_config(ModelConfig(path=MODELS[model]))
    n = ModelShape.from_config(config).params
    return {"n_params": n, "flops_per_token": (4 if lora else 6) * n
            + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq}


def measure_peaks(device: str) -> List[float]:
    """bf16 matmul peak (TFLOP/s, 8192^3, best of 5 x 10) of every visible GPU."""
    if device != "cuda":
        return []
    import torch

    peaks = [matmul_peak(torch.device("cuda", i), 8192) for i in range(torch.cuda.device_count())]
    torch.cuda.empty_cache()
    return peaks


def summarise(rows: List[Dict[str, Any]], peaks: List[float], warmup: int) -> None:
    """MFU; scaling efficiency against the same system's 1-GPU case with the same batch layout; ratios
    ours/trainer at equal GPUs and equal global batch (rows per GPU per optimizer step = micro x accumulation,
    however each system splits them); the median of the timed steps' own tokens/s/GPU beside the window's mean
    (single steps vary a lot here)."""
    def layout(r):
        return r.get("micro_batch", 1), r.get("grad_accum", 1)

    def rows_per_step(r):
        return layout(r)[0] * layout(r)[1]

    runs: Dict[tuple, List[float]] = {}  # repeated cases: compared by their mean
    for r in rows:
        if "tokens_per_s_per_gpu" in r:
            runs.setdefault((r["system"], r["model"], r["gpus"], layout(r)), []).append(r["tokens_per_s_per_gpu"])
    mean = {key: sum(values) / len(values) for key, values in runs.items()}
    peak = min(peaks) if peaks else None
    for r in rows:
        if "tokens_per_s_per_gpu" not in r:
            continue
        rate = r["tokens_per_s_per_gpu"]
        if r.get("step_seconds") and r.get("step_tokens"):
            per_step = [t / s / r["gpus"] for t, s in zip(r["step_tokens"][warmup:], r["step_seconds"][warmup:])]
            r["median_step_tokens_per_s_per_gpu"] = statistics.median(per_step)
            r["slowest_to_fastest_step"] = max(per_step) / min(per_step)
        if peak:
            r["mfu"] = rate * r["flops_per_token"] / (peak * 1e12)
        single = mean.get((r["system"], r["model"], 1, layout(r)))
        if single and r["gpus"] > 1:
            r["scaling_efficiency"] = rate / single
        baseline = {"ours": "trainer", "oursplain": "trainer", "oursflex": "trainer",
                    "ourslora": "trainerlora"}.get(r["system"])
        trainer = [v for (system, model, gpus, (mb, acc)), v in mean.items()
                   if (system, model, gpus, mb * acc) == (baseline, r["model"], r["gpus"], rows_per_step(r))]
        if trainer:
            r["vs_trainer"] = rate / (sum(trainer) / len(trainer))
        if r["system"] == "ours" and ("oursplain", r["model"], r["gpus"], layout(r)) in mean:
            r["vs_fused_off"] = rate / mean[("oursplain", r["model"], r["gpus"], layout(r))]
            plain = next(p for p in rows if p["system"] == "oursplain" and p["model"] == r["model"]
                         and p["gpus"] == r["gpus"] and layout(p) == layout(r) and "losses" in p)
            pairs = list(zip(r.get("losses", []), plain["losses"]))[:3]
            r["first_losses_rel_diff_vs_fused_off"] = [abs(a - b) / abs(b) for a, b in pairs]


def print_table(rows: List[Dict[str, Any]]) -> None:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    print("| case | micro x accum | tokens/s/GPU | median step tokens/s/GPU | slowest/fastest step | step s | MFU | "
          "max alloc GiB | max reserved GiB | act. ckpt | fused | cmd→first step s | scaling | vs Trainer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} |")
            continue
        median = fmt(r.get("median_step_tokens_per_s_per_gpu"), ",.0f")
        print(f"| {r['name']} | {r.get('micro_batch', 1)} x {r.get('grad_accum', 1)} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {median} | "
              f"{fmt(r.get('slowest_to_fastest_step'), '.2f')} | {r['step_s']:.3f} | {fmt(r.get('mfu'), '.1%')} | "
              f"{fmt(r.get('max_allocated_gib'), '.1f')} | {fmt(r.get('max_reserved_gib'), '.1f')} | "
              f"{'yes' if r.get('gradient_checkpointing') else 'no'} | {fmt(r.get('fused_kernels'), '')} | "
              f"{fmt(r.get('command_to_first_step_s'), '.1f')} | {fmt(r.get('scaling_efficiency'), '.3f')} | "
              f"{fmt(r.get('vs_trainer'), '.3f')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (all cases)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--tag", default="throughput")
    parser.add_argument("--scratch", default="/tmp/throughput")
    parser.add_argument("--resummarise", action="store_true",
                        help="recompute the figures of <out>/<tag>.json (after a change to this script) and print")
    args = parser.parse_args()
    out = Path(args.out)
    if args.resummarise:
        report = json.loads((out / f"{args.tag}.json").read_text())
        for row in report["rows"]:
            case = parse_case(row["name"])
            micro, accum = layout(case, row["micro_batch"], row)
            row.update(case)  # the case's own names win over what a baseline's JSON said
            row["micro_batch"], row["grad_accum"] = micro, accum
            row.update(model_flops_per_token(row["model"], row["seq"], "lora" in row["system"]))
        summarise(report["rows"], report["peaks_tflops"], args.warmup)
        (out / f"{args.tag}.json").write_text(json.dumps(report, indent=1))
        print_table(report["rows"])
        return
    out.mkdir(parents=True, exist_ok=True)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: Dict[str, Any] = {"command": " ".join(sys.argv), "versions": versions(args.device),
                              "peaks_tflops": measure_peaks(args.device), "rows": []}
    print(f"matmul peaks (TFLOP/s): {report['peaks_tflops']}", flush=True)
    data = make_rows(Path(args.scratch) / "data", args.rows)
    for name in args.cases.split(","):
        case = parse_case(name)
        if args.budget_s and time.time() - started > args.budget_s:
            report["rows"].append({**case, "error": "not started: over --budget-s"})
            continue
        log = out / f"{args.tag}_{name}.log"
        case_started = time.time()
        runner = run_ours if case["system"].startswith("ours") else run_trainer
        try:
            figures = runner(case, args, data, log)
        except Exception as err:  # noqa: BLE001  (one failed case must not lose the others' figures)
            figures = {"error": f"{type(err).__name__}: {err}"}
        micro, accum = layout(case, args.micro_batch, figures)
        row = {**model_flops_per_token(case["model"], args.seq, "lora" in case["system"]), **figures, **case,
               "seq": args.seq, "micro_batch": micro, "grad_accum": accum, "wall_s": time.time() - case_started}
        report["rows"].append(row)
        summarise(report["rows"], report["peaks_tflops"], args.warmup)
        print(f"{name}: " + (row["error"] if "error" in row else f"{row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
                             f"{row['wall_s']:.0f} s"), flush=True)
        (out / f"{args.tag}.json").write_text(json.dumps(report, indent=1))
    print_table(report["rows"])


if __name__ == "__main__":
    main()
