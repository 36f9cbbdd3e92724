"""What Ray Train adds to a training step, against torchrun running the very same step function.

One call does it all, in order (results are rewritten after each variant, so a timeout keeps what ran):
  1. per-GPU bf16 matmul peak (n^3 products, best of several), measured inside the first variant's workers;
  2. for each variant: `run_steps` (below) on every worker, launched by
       torchrun  — `python -m torch.distributed.run --nproc_per_node=W` (env:// process group), or
       ray       — our product path: launch.local.start_ray + TorchTrainer(ScalingConfig(W, use_gpu),
                   TorchConfig(backend)) as launch.local.run_training builds it;
     only the process-group setup differs (`_torchrun_main` / `_ray_train_fn`); the step is the product's own:
     orchestrator.train_loop.Recipe's build_engine (the model built from config with random init under ZeRO-3's
     zero.Init, orchestrator.deepspeed_config, the optimizer and schedule of orchestrator.optimization) and
     train_step (global-batch normalisation, the loss of orchestrator.losses, the all-reduced loss), on random
     token rows of one length (BenchRecipe replaces the setup_worker and build_data phases only);
  3. per worker: environment (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, NCCL_*, allocator), visible devices, torch
     threads, CPU affinity, thread, and the NCCL transports chosen (NCCL_DEBUG=INFO lines "via P2P/...").

Figures per variant: step time (timed window of --steps steps after --warmup, synchronised at both ends),
tokens/s/GPU, MFU, peak GPU memory (max over ranks), command to first step (from the Popen of the launcher to the
first step's start on rank 0). MFU = tokens/s/GPU * flops_per_token / matmul peak of that GPU, with
    flops_per_token = 6 * N + 12 * layers * hidden * seq
(N = unique parameters, the tied embedding/head counted once = the head's matmul; 12*L*H*S = forward QK^T and
AV, 2*2*S*H per layer, times 3 for forward + backward, no causal discount).

Usage (GPU):  python3 bench/ray_overhead.py --out $OUT
      (CPU):  python bench/ray_overhead.py --device cpu --model builtin:tiny-llama --seq 64 --micro-batch 2 \
                  --warmup 1 --steps 3 --out /tmp/ro
Variants: --variants torchrun,ray,... (see VARIANTS).
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRATCH = Path("/tmp/ray_overhead")

# name: launcher, extra environment for the whole launch (Ray: the driver, raylet and workers inherit it),
# step options. Order = priority: the call runs them in this order while its time budget lasts.
VARIANTS: Dict[str, Dict[str, Any]] = {
    # plain torchrun, the environment a user would have (multicast off, as everywhere here)
    "torchrun": {"launcher": "torchrun", "env": {}},
    # the product: start_ray passes GPU_ENV (with expandable_segments) to the workers
    "ray": {"launcher": "ray", "env": {}},
    # Ray with its worker processes at niceness 0 (Ray starts workers at RAY_worker_niceness=15)
    "ray_nice0": {"launcher": "ray", "env": {"RAY_worker_niceness": "0"}},
    # torchrun with the train function in a thread beside the main one, as Ray Train runs it
    "torchrun_thread": {"launcher": "torchrun", "env": {}, "thread": True},
    # torchrun with every process at niceness 15, as Ray's workers
    "torchrun_nice15": {"launcher": "torchrun", "env": {}, "prefix": ["nice", "-n", "15"]},
    # torchrun with the allocator setting that the Ray workers get: the same environment, launcher aside
    "torchrun_es": {"launcher": "torchrun", "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}},
    # Ray without expandable segments: does the allocator setting explain the gap?
    "ray_noes": {"launcher": "ray", "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}},
    # Ray with each worker masked to its own GPU (Ray Train's default is to share the node's GPUs)
    "ray_noshare": {"launcher": "ray", "env": {"TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES": "0"}},
    # Ray with more CPU threads per worker (Ray sets OMP_NUM_THREADS to the worker's CPUs, 1 by default)
    "ray_omp8": {"launcher": "ray", "env": {"OMP_NUM_THREADS": "8"}},
}
ENV_KEYS = re.compile(r"^(CUDA_VISIBLE_DEVICES|OMP_NUM_THREADS|MKL_NUM_THREADS|NCCL_.*|TORCH_NCCL_.*|"
                      r"PYTORCH_CUDA_ALLOC_CONF|CUDA_DEVICE_MAX_CONNECTIONS|LOCAL_RANK|RANK|WORLD_SIZE|"
                      r"LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES|"
                      r"TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES|RAY_worker_niceness|"
                      r"TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS|CUDA_LAUNCH_BLOCKING|PYTHONPATH)$")


# ----------------------------------------------------------------------------------------------------------
# The step function: identical for both launchers. Everything after the process group exists.
# ----------------------------------------------------------------------------------------------------------

class BenchRecipe:
    """The product's recipe (orchestrator.train_loop.Recipe) with two phases replaced: the process group comes
    from the launcher under test (torchrun or Ray Train), and the data are random token rows of one length.
    build_engine and train_step are the product's own, so the timed step is the one a user's run takes."""

    @staticmethod
    def make(rank: int, world: int, device_name: str, opts: Dict[str, Any]):
        import torch

        from orchestrator.config import Init, ModelConfig, RunConfig, Schedule, Task, TrainerConfig
        from orchestrator.data.batching import GlobalBatchSchedule
        from orchestrator.data.formats import Example
        from orchestrator.model import read_model_config
        from orchestrator.plan import Plan
        from orchestrator.train_loop import Recipe, WorkerInput

        use_gpu = device_name != "cpu"
        micro, seq, total = opts["micro_batch"], opts["seq"], opts["steps"] + opts["warmup"]
        run = RunConfig(model=ModelConfig(path=opts["model"], task=Task.causal_lm, init=Init.random),
                        trainer=TrainerConfig(max_steps=total, micro_batch_size=micro))
        # the full causal-LM defaults of orchestrator/hyperparameters.py, without a warmup: every step the same
        run.optim.lr, run.optim.weight_decay, run.optim.warmup_ratio = 1e-5, 0.0, 0.0
        run.optim.schedule = Schedule.cosine
        plan = Plan(strategy="full", num_workers=world, use_gpu=use_gpu, micro_batch_size=micro, grad_accum=1,
                    global_batch_size=micro * world, precision="bf16" if use_gpu else "fp32", zero_stage=3,
                    offload=False, gradient_checkpointing=False, predicted_gib_per_gpu=None, reason="bench",
                    max_steps=total)

        class Bench(Recipe):
            def setup_worker(self) -> None:  # the launcher made the process group; join it as the product does
                import deepspeed

                self.rank, self.world_size, self.device = rank, world, torch.device(device_name)
                deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
                torch.manual_seed(0)

            def build_data(self) -> None:
                generator = torch.Generator().manual_seed(1000)
                vocab = read_model_config(self.run_config.model)["vocab_size"]
                rows = [torch.randint(0, vocab, (seq,), generator=generator).tolist()
                        for _ in range(4 * self.plan.global_batch_size)]
                self.data = _RandomRows([Example(input_ids=r, target=list(r)) for r in rows])
                self.tokenizer = _PadOnly()
                self.class_weights, self.packed_length = None, None
                self.lengths = [seq] * len(rows)
                self.schedule = GlobalBatchSchedule(len(rows), self.plan.global_batch_size, 0)

        return Bench(WorkerInput(run=run, plan=plan))


class _RandomRows:
    def __init__(self, train):
        self.train, self.validation, self.labels = train, [], None


class _PadOnly:
    pad_token_id = 0


def run_steps(rank: int, world: int, device_name: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    """Build the engine and run warmup + timed steps with the product's Recipe.train_step; return rank 0's
    figures with every rank's environment (other ranks return {})."""
    import torch
    import torch.distributed as dist

    use_gpu = device_name != "cpu"
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import logging

    import deepspeed
    import transformers

    deepspeed.utils.logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
    device = torch.device(device_name)
    marks = {"entered": time.time()}
    recipe = BenchRecipe.make(rank, world, device_name, opts)
    recipe.setup_worker()
    info = worker_info(rank, device)

    peak_tflops = None
    if opts.get("matmul_peak") and use_gpu:
        peak_tflops = matmul_peak(device, opts["matmul_n"])

    steps, warmup, micro, seq = opts["steps"], opts["warmup"], opts["micro_batch"], opts["seq"]
    recipe.build_data()
    recipe.build_engine()
    config = recipe.model.config
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in recipe.model.parameters())
    marks["engine_ready"] = time.time()

    def sync():
        if use_gpu:
            torch.cuda.synchronize(device)

    host_step_s: List[float] = []
    losses: List[float] = []
    for i in range(warmup + steps):
        if i == 0:
            marks["first_step"] = time.time()
        if i == warmup:
            sync()
            dist.barrier()
            sync()
            window_start = time.perf_counter()
            marks["window_start"] = time.time()
        measured = recipe.train_step(i)  # ends on the loss's .item(): the step is done on the device
        losses.append(measured.loss)
        host_step_s.append(measured.seconds)
    sync()
    window_s = time.perf_counter() - window_start
    marks["done"] = time.time()

    step_s = window_s / steps
    tokens_per_gpu = micro * seq
    flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq
    result: Dict[str, Any] = {
        "step_s": step_s, "tokens_per_s_per_gpu": tokens_per_gpu / step_s,
        "model_tflops_per_gpu": tokens_per_gpu / step_s * flops_per_token / 1e12,
        "n_params": n_params, "flops_per_token": flops_per_token, "tokens_per_step_per_gpu": tokens_per_gpu,
        "median_step_s": statistics.median(host_step_s[warmup:]), "host_step_s": host_step_s,
        "final_loss_per_token": losses[-1] if losses else None, "losses": losses, "vocab_size": config.vocab_size,
        "marks": marks, "matmul_peak_tflops": peak_tflops,
    }
    if use_gpu:
        peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                             dtype=torch.float64, device=device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        result["max_allocated_gib"] = peaks[0].item() / 2**30
        result["max_reserved_gib"] = peaks[1].item() / 2**30
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, {"info": info, "matmul_peak_tflops": peak_tflops,
                                      "step_s": step_s})
    result["workers"] = gathered
    del recipe
    gc.collect()
    return result if rank == 0 else {}


def worker_info(rank: int, device) -> Dict[str, Any]:
    import torch

    info = {"rank": rank, "pid": os.getpid(), "device": str(device),
            "env": {k: v for k, v in sorted(os.environ.items()) if ENV_KEYS.match(k)},
            "main_thread": threading.current_thread() is threading.main_thread(),
            "thread": threading.current_thread().name,
            "torch_threads": torch.get_num_threads(), "switch_interval_s": sys.getswitchinterval(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "gc_enabled": gc.isenabled(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0)}  # Linux: the calling thread's
    if device.type == "cuda":
        count = torch.cuda.device_count()
        info.update(cuda_device_count=count, gpu=torch.cuda.get_device_name(device),
                    current_device=torch.cuda.current_device(),
                    peer_access=[torch.cuda.can_device_access_peer(i, j) for i in range(count)
                                 for j in range(count) if i != j])
    return info


def matmul_peak(device, n: int, trials: int = 5, reps: int = 10) -> float:
    """Best of `trials` timings of `reps` n x n x n bf16 products (TFLOP/s)."""
    import torch

    torch.cuda.set_device(device)  # events and products on the same GPU (else other GPUs time as 0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return best


# ----------------------------------------------------------------------------------------------------------
# Launchers: only the process group setup differs.
# ----------------------------------------------------------------------------------------------------------

def _torchrun_main(opts: Dict[str, Any]) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_gpu = opts["device"] == "cuda"
    device_name = f"cuda:{local_rank}" if use_gpu else "cpu"
    if use_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_gpu else "gloo",
                            timeout=datetime.timedelta(seconds=1800))  # as Ray's TorchConfig

    def body():
        if use_gpu:
            torch.cuda.set_device(local_rank)  # per thread, as the Ray worker's training thread does
        result = run_steps(rank, world, device_name, opts)
        if rank == 0:
            Path(opts["result_path"]).write_text(json.dumps(result))

    if opts.get("thread"):  # as Ray Train runs the train function: in a thread beside the main one
        worker = threading.Thread(target=body, name="TrainingThread", daemon=True)
        worker.start()
        worker.join()
    else:
        body()
    dist.destroy_process_group()


def _ray_train_fn(config: Dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    opts = config["opts"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # as orchestrator.train_loop does
    result = run_steps(rank, world, str(device), opts)
    if rank == 0:
        Path(opts["result_path"]).write_text(json.dumps(result))


def _ray_main(opts: Dict[str, Any]) -> None:
    """The product's launch path: launch.local.start_ray, then TorchTrainer as launch.local.run_training."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from launch.local import start_ray
    from orchestrator.config import ClusterConfig

    use_gpu = opts["device"] == "cuda"
    start_ray(ClusterConfig(cpu_workers=opts["workers"]))
    trainer = TorchTrainer(
        _ray_train_fn, train_loop_config={"opts": opts},
        scaling_config=ray.train.ScalingConfig(num_workers=opts["workers"], use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=f"ray_overhead_{opts['variant']}",
                                       storage_path=str(SCRATCH / "ray_storage"),
                                       failure_config=ray.train.FailureConfig(max_failures=0),
                                       logging_config=LoggingConfig(log_level="WARNING")))
    trainer.fit()
    ray.shutdown()


# ----------------------------------------------------------------------------------------------------------
# The orchestrating driver
# ----------------------------------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Every ~0.5 s while a variant runs: host CPU counters (/proc/stat) and, on GPU, each GPU's utilisation,
    SM clock, power and temperature (nvidia-smi), to tell launcher effects from the machine's own noise."""

    def __init__(self, gpu: bool):
        super().__init__(daemon=True)
        self.gpu, self.samples, self.stop_event = gpu, [], threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            sample: Dict[str, Any] = {"t": time.time()}
            try:
                with open("/proc/stat") as f:
                    sample["cpu"] = [int(x) for x in f.readline().split()[1:]]
            except OSError:
                pass
            if self.gpu:
                try:
                    text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,clocks.sm,power.draw,"
                                           "temperature.gpu", "--format=csv,noheader,nounits"],
                                          capture_output=True, text=True, timeout=5).stdout
                    sample["gpus"] = [[float(v) for v in line.split(",")] for line in text.strip().splitlines()]
                except Exception:  # noqa: BLE001
                    pass
            self.samples.append(sample)
            self.stop_event.wait(0.5)

    def window(self, start: float, end: float) -> Dict[str, Any]:
        inside = [s for s in self.samples if start <= s["t"] <= end]
        summary: Dict[str, Any] = {"samples": len(inside)}
        cpu = [s["cpu"] for s in inside if "cpu" in s]
        if len(cpu) >= 2:  # user nice system idle iowait irq softirq steal ...
            delta = [b - a for a, b in zip(cpu[0], cpu[-1])]
            total = sum(delta[:8]) or 1
            summary["host_cpu_busy"] = 1 - (delta[3] + delta[4]) / total
            summary["host_cpu_steal"] = delta[7] / total if len(delta) > 7 else None
        gpus = [s["gpus"] for s in inside if s.get("gpus")]
        if gpus:
            for i in range(len(gpus[0])):
                values = [g[i] for g in gpus if len(g) > i]
                summary[f"gpu{i}"] = {"util_mean": sum(v[0] for v in values) / len(values),
                                      "sm_clock_min": min(v[1] for v in values),
                                      "sm_clock_mean": sum(v[1] for v in values) / len(values),
                                      "power_mean_w": sum(v[2] for v in values) / len(values),
                                      "temp_max_c": max(v[3] for v in values)}
        return summary


def run_variant(name: str, args, out: Path, base_env: Dict[str, str], timeout_s: float, repeat: int = 0,
                matmul: bool = False) -> Dict[str, Any]:
    spec = VARIANTS[name]
    work = SCRATCH / f"{name}.{repeat}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "nccl").mkdir(parents=True)
    opts = {"variant": name, "device": args.device, "workers": args.workers, "model": args.model,
            "seq": args.seq, "micro_batch": args.micro_batch, "warmup": args.warmup, "steps": args.steps,
            "matmul_peak": matmul, "matmul_n": args.matmul_n,
            "thread": spec.get("thread", False),
            "result_path": str(work / "result.json")}
    env = {**base_env, **spec["env"], "NCCL_DEBUG_FILE": str(work / "nccl" / "%h.%p.log")}
    script = str(Path(__file__).resolve())
    if spec["launcher"] == "torchrun":
        command = [*spec.get("prefix", []), sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.workers}", script, "_torchrun", json.dumps(opts)]
    else:
        command = [sys.executable, script, "_ray", json.dumps(opts)]
    started_wall = time.time()
    started = time.perf_counter()
    log_path = work / "log.txt"
    sampler = Sampler(args.device == "cuda")
    sampler.start()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group this call started: launcher, workers, Ray
            process.wait()
            rc = "timeout"
    wall_s = time.perf_counter() - started
    sampler.stop_event.set()
    sampler.join()
    with open(out / "variants.log", "a") as combined:
        combined.write(f"\n===== {name} #{repeat}: rc={rc} wall={wall_s:.1f}s command={' '.join(command[:-1])} =====\n")
        combined.write(log_path.read_text(errors="replace")[-60000:])
    nccl_lines = []
    for path in sorted(glob.glob(str(work / "nccl" / "*.log"))):
        text = Path(path).read_text(errors="replace")
        with open(out / "nccl.log", "a") as combined:
            combined.write(f"\n===== {name} #{repeat}: {os.path.basename(path)} =====\n{text}")
        nccl_lines += [line.strip() for line in text.splitlines()
                       if " via " in line or "NCCL version" in line or "NVLS" in line or "cudaDev" in line]
    row: Dict[str, Any] = {"variant": name, "repeat": repeat, "launcher": spec["launcher"],
                           "env_overrides": spec["env"],
                           "rc": rc, "wall_s": wall_s}
    result_path = Path(opts["result_path"])
    if result_path.exists():
        result = json.loads(result_path.read_text())
        result["command_to_first_step_s"] = result["marks"]["first_step"] - started_wall
        row.update(result)
        row["machine_in_window"] = sampler.window(result["marks"]["window_start"], result["marks"]["done"])
    row["nccl_transports"] = sorted({m.group(1) for line in nccl_lines for m in [re.search(r" via (\S+)", line)]
                                     if m})
    row["nccl_lines"] = nccl_lines[:40]
    return row


def versions(device: str) -> Dict[str, Any]:
    import deepspeed
    import ray
    import torch
    import transformers

    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "deepspeed": deepspeed.__version__, "ray": ray.__version__, "transformers": transformers.__version__,
             "cpus": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if device == "cuda" else None
    except Exception as err:  # noqa: BLE001
        found["nccl"] = f"unknown ({err})"
    if device == "cuda":
        try:
            found["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            found["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                               timeout=30).stdout
        except Exception as err:  # noqa: BLE001
            found["nvidia_smi"] = f"unavailable ({err})"
    return found


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """MFU per run; per variant the median over its runs; ratios of medians against the torchrun baselines,
    and Ray/torchrun per adjacent pair (torchrun #k against ray #k: the same minutes of the machine)."""
    peaks = [w["matmul_peak_tflops"] for r in rows for w in r.get("workers", []) if w.get("matmul_peak_tflops")]
    peak = min(peaks) if peaks else None  # the slowest GPU's best: every step waits for it
    done = [r for r in rows if "step_s" in r]
    for r in done:
        r["mfu"] = r["model_tflops_per_gpu"] / peak if peak else None
    variants: Dict[str, Any] = {}
    for r in done:
        v = variants.setdefault(r["variant"], {"launcher": r["launcher"], "tokens_per_s_per_gpu": [],
                                               "median_step_tokens_per_s_per_gpu": [],
                                               "command_to_first_step_s": [], "max_allocated_gib": [],
                                               "max_reserved_gib": [], "mfu": []})
        v["tokens_per_s_per_gpu"].append(r["tokens_per_s_per_gpu"])
        v["median_step_tokens_per_s_per_gpu"].append(r["tokens_per_step_per_gpu"] / r["median_step_s"])
        v["command_to_first_step_s"].append(r["command_to_first_step_s"])
        v["mfu"].append(r["mfu"])
        for key in ("max_allocated_gib", "max_reserved_gib"):
            if key in r:
                v[key].append(r[key])
    for v in variants.values():
        v["runs"] = len(v["tokens_per_s_per_gpu"])
        for key in ("tokens_per_s_per_gpu", "median_step_tokens_per_s_per_gpu", "command_to_first_step_s",
                    "max_allocated_gib", "max_reserved_gib", "mfu"):
            values = [x for x in v[key] if x is not None]
            v[f"{key}_median"] = statistics.median(values) if values else None
    for v in variants.values():
        for base in ("torchrun", "torchrun_es"):
            if base in variants:
                v[f"ratio_vs_{base}"] = v["tokens_per_s_per_gpu_median"] / variants[base]["tokens_per_s_per_gpu_median"]
    pairs = []
    by_key = {(r["variant"], r["repeat"]): r for r in done}
    for (name, repeat), r in by_key.items():
        if name == "ray" and ("torchrun", repeat) in by_key:
            pairs.append(r["tokens_per_s_per_gpu"] / by_key[("torchrun", repeat)]["tokens_per_s_per_gpu"])
    return {"matmul_peak_tflops_per_gpu": peaks, "matmul_peak_tflops_used": peak, "variants": variants,
            "ray_over_torchrun_pairs": pairs}


def print_table(report: Dict[str, Any]) -> None:
    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    print("| variant #run | launcher | tokens/s/GPU | step s | median step s | MFU | max alloc GiB | "
          "max reserved GiB | cmd→first step s | GPU util % | SM clock min MHz | host steal | NCCL transports |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        if "step_s" not in r:
            print(f"| {r['variant']} #{r.get('repeat', 0)} | {r['launcher']} | failed (rc={r['rc']}) |"
                  " | | | | | | | | | |")
            continue
        m = r.get("machine_in_window", {})
        gpus = [m[k] for k in sorted(m) if k.startswith("gpu")]
        util = "/".join(f"{g['util_mean']:.0f}" for g in gpus) or "-"
        clock = "/".join(f"{g['sm_clock_min']:.0f}" for g in gpus) or "-"
        print(f"| {r['variant']} #{r['repeat']} | {r['launcher']} | {fmt(r['tokens_per_s_per_gpu'], ',.0f')} | "
              f"{fmt(r['step_s'], '.4f')} | {fmt(r['median_step_s'], '.4f')} | {fmt(r.get('mfu'), '.1%')} | "
              f"{fmt(r.get('max_allocated_gib'), '.1f')} | {fmt(r.get('max_reserved_gib'), '.1f')} | "
              f"{fmt(r['command_to_first_step_s'], '.1f')} | {util} | {clock} | "
              f"{fmt(m.get('host_cpu_steal'), '.1%')} | {','.join(r.get('nccl_transports', [])) or '-'} |")
    print()
    print("| variant | runs | tokens/s/GPU (median of runs) | range | MFU | max reserved GiB | cmd→first step s | "
          "vs torchrun | vs torchrun_es |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, v in report.get("variants", {}).items():
        values = v["tokens_per_s_per_gpu"]
        print(f"| {name} | {v['runs']} | {fmt(v['tokens_per_s_per_gpu_median'], ',.0f')} | "
              f"{min(values):,.0f}–{max(values):,.0f} | {fmt(v['mfu_median'], '.1%')} | "
              f"{fmt(v['max_reserved_gib_median'], '.1f')} | {fmt(v['command_to_first_step_s_median'], '.1f')} | "
              f"{fmt(v.get('ratio_vs_torchrun'), '.3f')} | {fmt(v.get('ratio_vs_torchrun_es'), '.3f')} |")
    if report.get("ray_over_torchrun_pairs"):
        print("Ray/torchrun per adjacent pair: " + ", ".join(f"{x:.3f}" for x in report["ray_over_torchrun_pairs"]))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("_torchrun", "_ray"):
        opts = json.loads(sys.argv[2])
        (_torchrun_main if sys.argv[1] == "_torchrun" else _ray_main)(opts)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="builtin:llama-3.2-1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--variants", default="torchrun,ray,ray_nice0,torchrun_es,torchrun_thread,ray_noes,"
                                                  "torchrun_nice15,ray_noshare")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no variant after this many seconds")
    parser.add_argument("--variant-timeout-s", type=float, default=200)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ)
    base_env.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                     "NCCL_DEBUG": "INFO", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                     "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)})
    base_env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # each variant says its own; Ray's comes from GPU_ENV
    report: Dict[str, Any] = {"script": "bench/ray_overhead.py", "argv": sys.argv[1:], "tag": args.tag,
                              "versions": versions(args.device),
                              "flops_per_token_formula": "6*N + 12*layers*hidden*seq (N = unique parameters)",
                              "settings": {k: getattr(args, k) for k in ("device", "workers", "model", "seq",
                                                                         "micro_batch", "warmup", "steps",
                                                                         "matmul_n")},
                              "rows": []}
    json_path = out / "ray_overhead.json"
    seen: Dict[str, int] = {}
    for name in args.variants.split(","):
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            print(f"[ray_overhead] skipping {name}: {elapsed:.0f}s spent of the {args.budget_s:.0f}s budget",
                  flush=True)
            report["rows"].append({"variant": name, "launcher": VARIANTS[name]["launcher"], "rc": "skipped"})
            continue
        repeat = seen.get(name, -1) + 1
        seen[name] = repeat
        print(f"[ray_overhead] {name} #{repeat} ...", flush=True)
        matmul = args.device == "cuda" and not any(r.get("matmul_peak_tflops") for r in report["rows"])
        row = run_variant(name, args, out, base_env, args.variant_timeout_s, repeat, matmul)
        report["rows"].append(row)
        report.update(summarise(report["rows"]))
        json_path.write_text(json.dumps(report, indent=1))
        print(f"[ray_overhead] {name} #{repeat}: rc={row['rc']} wall={row['wall_s']:.1f}s "
              f"tokens/s/GPU={row.get('tokens_per_s_per_gpu', float('nan')):.0f} "
              f"step={row.get('step_s', float('nan')):.4f}s transports={row.get('nccl_transports')}", flush=True)
    print_table(report)
    print(f"[ray_overhead] total {time.perf_counter() - t0:.0f}s; JSON: {json_path}")


if __name__ == "__main__":
    main()
