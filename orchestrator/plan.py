"""Resources + config → Plan: which strategy, how many workers, what batch layout, and why.

A pure function: the same Plan drives a local run, a RayJob manifest and each sweep trial. The rule:
  no GPU          → CPU workers (ZeRO-3 over gloo), or the forced strategy if it runs on CPU;
  two or more GPUs → full ZeRO-3 if it fits, else full ZeRO-3 with CPU offload if that fits;
  one GPU         → LoRA, or QLoRA when even the bf16 weights do not fit.
Activation checkpointing is switched on only where a candidate does not fit without it.
With trainer.micro_batch_size=null the strategy is chosen at one row per micro-batch, then the micro-batch is the
largest divisor of the rows each worker gets per optimizer step that still fits (without checkpointing where any
does): ZeRO-3 gathers every layer once per micro-batch, so fewer, larger micro-batches cost the same gathers
for more tokens (bench/RESULTS.md: 2.1x the tokens/s at 1B for 8 x 1 against 2 x 4 rows, same global batch).
The memory arithmetic is in memory.py; this module only compares its numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import List, Optional, Tuple

from orchestrator import kernels
from orchestrator.config import Precision, RunConfig, Strategy, in_process_mode
from orchestrator.errors import UserError
from orchestrator.memory import GIB, Estimate, ModelShape, estimate, fits, host_bytes_for_offload

CANDIDATES = (Strategy.full, Strategy.full_offload, Strategy.lora, Strategy.qlora)  # what the planner compares
# the planner's adapter candidates: alone on one worker they run without ZeRO (nothing to partition)
PEFT_STRATEGIES = tuple(s for s in CANDIDATES if s.uses_adapters)
# a plan (the strategy's check and the micro-batch pick alike) fills at most this share of a GPU: the estimate ran
# 2-4% above the measured peaks where checked (bench/RESULTS.md), and an out-of-memory error would lose the run
MICRO_BATCH_MEMORY_SHARE = 0.9


@dataclass
class ClusterResources:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: Optional[float]  # per GPU; None when unknown or no GPU
    cpus: int
    host_memory_gb: Optional[float] = None  # per node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Candidate:
    strategy: Strategy
    gib_per_gpu: Optional[float]  # None on CPU
    checkpointing: bool
    fits: Optional[bool]  # within MICRO_BATCH_MEMORY_SHARE of the GPU; None: GPU memory unknown, nothing checked
    note: str = ""

    def __post_init__(self):
        self.strategy = Strategy(self.strategy)


@dataclass
class Plan:
    strategy: Strategy  # never auto
    num_workers: int
    use_gpu: bool
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int  # rows per optimizer step = workers * micro * accumulation
    precision: Precision  # bf16 or fp32, never auto
    zero_stage: int  # 3, or 0 for a single-worker PEFT run (nothing to partition)
    offload: bool  # ZeRO-3 optimizer state and parameters in host memory
    gradient_checkpointing: bool
    predicted_gib_per_gpu: Optional[float]
    reason: str  # one sentence: why this plan
    candidates: List[Candidate] = field(default_factory=list)
    fused_kernels: bool = False  # Liger Kernel (orchestrator/kernels.py)
    fused_kernels_reason: str = ""
    micro_batch_reason: str = ""  # set where the planner picked the micro-batch (trainer.micro_batch_size=null)
    # how long and at what rates (orchestrator/hyperparameters.py; filled by preflight once the data is counted)
    max_steps: int = 0  # optimizer steps of the whole run
    steps_per_epoch: int = 0
    steps_reason: str = ""
    eval_every: int = 0  # steps between validation evaluations (0 = before and after only)
    select_metric: str = "loss"  # eval/<this> chooses the exported weights
    selection_reason: str = ""
    hyperparameters: dict = field(default_factory=dict)  # key -> {value, source}: what the strategy's defaults filled
    # where the recipe runs (choose_launch, from cluster.in_process): this process (Ray Train's local mode) or Ray
    # Train's worker processes; set where the run starts (preflight)
    in_process: bool = False
    launch_reason: str = ""

    def __post_init__(self):  # a plan built by hand (benchmarks) may name them as strings
        self.strategy, self.precision = Strategy(self.strategy), Precision(self.precision)

    def for_workers(self, workers: int) -> "Plan":
        """This plan on another number of workers with the same global batch: more or less accumulation, the rest
        kept. For a run that continues on another world size (a resume on other workers, an elastic restart: issue
        16), so that the data order and the loss curve stay the same run's. Full fine-tuning only (adapters on one
        worker train without ZeRO, on a PlainEngine); a global batch that workers x micro-batch does not divide is a
        UserError. The memory prediction is not redone: fewer ZeRO-3 workers hold more of the states each."""
        if workers == self.num_workers:
            return self
        if self.strategy not in (Strategy.full, Strategy.full_offload):
            raise UserError(f"strategy={self.strategy} continues only on the {self.num_workers} worker(s) it started "
                            f"on, not on {workers}: another number of workers is supported for strategy=full and "
                            "strategy=full_offload")
        per_pass = workers * self.micro_batch_size
        if self.global_batch_size % per_pass:
            raise UserError(f"the global batch of {self.global_batch_size} rows cannot be kept on {workers} worker(s) "
                            f"x micro-batch {self.micro_batch_size} = {per_pass} rows per pass")
        return replace(self, num_workers=workers, grad_accum=self.global_batch_size // per_pass)

    def to_json(self) -> str:
        """plan.json: the enums as their values."""
        return json.dumps(asdict(self, dict_factory=_plain), indent=2)

    def save(self, run_dir: str) -> None:
        """<run_dir>/plan.json: what was decided and why, beside the run's results."""
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "plan.json"), "w", encoding="utf-8") as handle:
            handle.write(self.to_json())


def _plain(items) -> dict:
    return {key: value.value if isinstance(value, Enum) else value for key, value in items}


def make_plan(run: RunConfig, resources: ClusterResources, model_config: dict) -> Plan:
    shape = ModelShape.from_config(model_config)
    use_gpu = resources.gpus > 0
    workers = worker_count(run, resources)
    fused, fused_reason = kernels.decide(run.model, model_config, use_gpu)
    fused_loss = kernels.fuses_loss(fused, run.model.task)
    auto_micro = run.trainer.micro_batch_size is None
    micro = 1 if auto_micro else run.trainer.micro_batch_size  # auto: choose the strategy at one row

    def candidates_for(micro_batch: int) -> List[Candidate]:
        if not use_gpu:
            return []
        return [_candidate(strategy, shape, workers, micro_batch * run.data.max_length, resources, run, fused_loss)
                for strategy in CANDIDATES]

    candidates = candidates_for(micro)
    strategy = _choose(run.strategy, candidates, resources, workers)
    if strategy.quantized and use_gpu and workers > 1:
        one_node = " cluster.nodes=1" if resources.nodes > 1 else ""
        raise UserError(f"strategy=qlora runs on one GPU and this plan has {workers} workers: set cluster.gpus=1"
                        f"{one_node} (one worker on one GPU), or strategy=lora to train adapters on every GPU")
    micro_reason = ""
    if auto_micro:
        micro, micro_reason = _largest_micro_batch(strategy, shape, workers, resources, run, fused_loss)
        candidates = candidates_for(micro)
    chosen = next((c for c in candidates if c.strategy == strategy), None)
    if chosen is not None and chosen.fits is False:
        raise UserError(f"strategy={strategy} does not fit: predicted {chosen.gib_per_gpu:.1f} GiB per GPU "
                        f"{chosen.note}against {resources.gpu_memory_gb:.0f} GiB (a plan fills at most "
                        f"{MICRO_BATCH_MEMORY_SHARE:.0%}: {_limit_gb(resources):.1f} GiB); "
                        f"{_fitting_hint(candidates)}")
    # why, in the figures of the table printed with it: those of the micro-batch picked
    reason = _why(strategy, run.strategy, candidates, resources, workers)
    if auto_micro and candidates:
        reason += f" (at the picked micro-batch of {micro} row{'s' if micro > 1 else ''}; strategies compared at one)"
    if strategy.quantized and not use_gpu:
        raise UserError("strategy=qlora needs a GPU (bitsandbytes 4-bit kernels are CUDA-only); "
                        "on CPU use strategy=lora or strategy=full")

    accum = run.trainer.grad_accum
    if run.trainer.global_batch_size is not None:
        per_pass = workers * micro
        if run.trainer.global_batch_size % per_pass:
            raise UserError(f"trainer.global_batch_size={run.trainer.global_batch_size} is not allowed: it must be "
                            f"a multiple of workers x micro-batch = {workers} x {micro} = {per_pass}")
        accum = run.trainer.global_batch_size // per_pass
    precision = run.trainer.precision
    if precision is Precision.auto:
        precision = Precision.bf16 if use_gpu else Precision.fp32
    single_worker_peft = strategy in PEFT_STRATEGIES and workers == 1
    return Plan(strategy=strategy, num_workers=workers, use_gpu=use_gpu, micro_batch_size=micro, grad_accum=accum,
                global_batch_size=workers * micro * accum, precision=precision,
                zero_stage=0 if single_worker_peft else 3, offload=strategy.offloads,
                gradient_checkpointing=chosen.checkpointing if chosen else bool(run.model.gradient_checkpointing),
                predicted_gib_per_gpu=chosen.gib_per_gpu if chosen else None, reason=reason, candidates=candidates,
                fused_kernels=fused, fused_kernels_reason=fused_reason, micro_batch_reason=micro_reason)


def worker_count(run: RunConfig, resources: ClusterResources) -> int:
    """A worker per GPU; without GPUs, cluster.cpu_workers."""
    return resources.gpus if resources.gpus > 0 else run.cluster.cpu_workers


def ray_needed_for(run: RunConfig, fault_drill: bool) -> str:
    """Why this run needs Ray Train's worker processes whatever its number of workers, or "" (cluster.in_process)."""
    if run.cluster.address is not None:
        return "the workers run on the Ray cluster at cluster.address (a sweep's trials join the sweep's this way)"
    if run.trainer.elastic:
        return "trainer.elastic restarts on as many workers as Ray Train can place"
    if fault_drill:
        return "the failure drill (ORCHESTRATOR_KILL_WORKER) kills the worker's process, which would be this one"
    return ""


def choose_launch(run: RunConfig, plan: Plan, fault_drill: bool) -> Tuple[bool, str]:
    """Whether the recipe runs in this process (Ray Train's local mode, Ray not started: no Ray start and no worker
    process, 19-20 s of the start on one H200, bench/RESULTS.md) or on Ray Train's workers, and why, for the plan's
    `launch:` line.
    cluster.in_process=true where that cannot be is a UserError saying why."""
    mode = in_process_mode(run.cluster)
    if mode == "false":
        return False, "Ray Train's worker processes (cluster.in_process=false)"
    why_not = ray_needed_for(run, fault_drill) or (
        f"{plan.num_workers} workers, a process each" if plan.num_workers != 1 else "")
    if why_not and mode == "true":
        raise UserError(f"cluster.in_process=true is not allowed for this run: {why_not}; set "
                        "cluster.in_process=auto (Ray Train's workers where they are needed) or false")
    if why_not:
        return False, f"Ray Train's worker processes (cluster.in_process=auto: {why_not})"
    return True, (f"in this process, without starting Ray (cluster.in_process={mode}: one worker on this machine, "
                  "nothing that needs Ray)")


def _largest_micro_batch(strategy: Strategy, shape: ModelShape, workers: int, resources: ClusterResources,
                         run: RunConfig, fused_loss: bool) -> Tuple[int, str]:
    """The largest divisor of the rows per worker per optimizer step whose memory estimate fits one GPU, without
    activation checkpointing if any does (the rule for checkpointing elsewhere in the plan), and why."""
    global_batch = run.trainer.global_batch_size
    if global_batch % workers:
        raise UserError(f"trainer.global_batch_size={global_batch} is not allowed: it must be a multiple of the "
                        f"{workers} workers (trainer.micro_batch_size=null splits it over them)")
    rows = global_batch // workers
    if resources.gpus == 0:
        return rows, f"{rows}: all {rows} rows per worker in one pass (CPU workers: no GPU memory to fit)"
    if resources.gpu_memory_gb is None:
        return rows, (f"{rows}: all {rows} rows per worker in one pass (GPU memory unknown: set "
                      "cluster.gpu_memory_gb to have the pick fit it)")
    divisors = [d for d in range(rows, 0, -1) if rows % d == 0]
    for checkpointing in _checkpointing_options(run):  # every micro-batch without checkpointing before any with
        for micro in divisors:
            predicted = _predicted(strategy, shape, workers, micro * run.data.max_length, checkpointing, run,
                                   fused_loss)
            if fits(predicted, resources.gpu_memory_gb * MICRO_BATCH_MEMORY_SHARE):
                how = "with activation checkpointing" if checkpointing else "without activation checkpointing"
                return micro, (f"{micro}: the largest divisor of the {rows} rows per worker per step that fits "
                               f"{MICRO_BATCH_MEMORY_SHARE:.0%} of the GPU {how} ({predicted.gib:.1f} GiB "
                               "predicted); fewer, larger micro-batches do the same work in fewer passes (under "
                               "ZeRO-3: fewer gathers of every layer)")
    return 1, f"1: no micro-batch of the {rows} rows per worker fits; the strategy's check says by how much"


def _checkpointing_options(run: RunConfig) -> List[bool]:
    """Activation checkpointing settings to try, in order: the forced one, else without first (it is ~30% faster
    where memory allows), then with."""
    forced = run.model.gradient_checkpointing
    return [forced] if forced is not None else [False, True]


def _predicted(strategy: Strategy, shape: ModelShape, workers: int, tokens: int, checkpointing: bool, run: RunConfig,
               fused_loss: bool) -> Estimate:
    return estimate(strategy, shape, workers, tokens, checkpointing, run.peft.rank, run.model.freeze_depth,
                    fused_loss, seq_len=run.data.max_length, lora_targets=run.peft.target_modules)


def _limit_gb(resources: ClusterResources) -> Optional[float]:
    """What a plan may fill of one GPU (None: GPU memory unknown)."""
    memory = resources.gpu_memory_gb
    return None if memory is None else memory * MICRO_BATCH_MEMORY_SHARE


def _candidate(strategy: Strategy, shape: ModelShape, workers: int, tokens: int, resources: ClusterResources,
               run: RunConfig, fused_loss: bool) -> Candidate:
    options = _checkpointing_options(run)
    limit = _limit_gb(resources)
    for checkpointing in options:
        result = _predicted(strategy, shape, workers, tokens, checkpointing, run, fused_loss)
        ok = None if limit is None else fits(result, limit)  # None: nothing to check against
        note = ""
        if ok is not False and strategy.offloads and resources.host_memory_gb is not None:
            host_needed = host_bytes_for_offload(shape, resources.nodes) / GIB
            if host_needed > 0.8 * resources.host_memory_gb:
                ok = False
            note = f"(host {host_needed:.0f} of {resources.host_memory_gb:.0f} GiB per node) "
        if strategy.quantized and workers > 1:
            ok, note = False, "(QLoRA runs on one GPU) "
        if ok is not False or checkpointing == options[-1]:
            return Candidate(strategy, round(result.gib, 2), checkpointing, ok, note)
    raise AssertionError("unreachable")


def _choose(requested: Strategy, candidates: List[Candidate], resources: ClusterResources, workers: int) -> Strategy:
    """The strategy by the rule of the module's docstring; a candidate of unknown fit (GPU memory unknown) counts
    as fitting: the rule alone decides."""
    if requested is not Strategy.auto:
        return requested
    if not candidates:
        return Strategy.full
    ok = {c.strategy: c.fits is not False for c in candidates}
    if workers >= 2:
        for strategy in (Strategy.full, Strategy.full_offload):
            if ok[strategy]:
                return strategy
        raise UserError(f"no full fine-tuning plan fits {workers} x {resources.gpu_memory_gb:.0f} GiB "
                        f"(a plan fills at most {MICRO_BATCH_MEMORY_SHARE:.0%}): {_fitting_hint(candidates)}")
    for strategy in (Strategy.lora, Strategy.qlora):
        if ok[strategy]:
            return strategy
    raise UserError(f"nothing fits one GPU of {resources.gpu_memory_gb:.0f} GiB (a plan fills at most "
                    f"{MICRO_BATCH_MEMORY_SHARE:.0%}): {_fitting_hint(candidates)}")


def _why(strategy: Strategy, requested: Strategy, candidates: List[Candidate], resources: ClusterResources,
         workers: int) -> str:
    """One sentence: why this strategy, quoting the candidates' figures (those of the table printed with it)."""
    if requested is not Strategy.auto:
        return f"strategy={requested.value} was set {setting_source('strategy')}"
    if not candidates:
        return f"no GPU: {workers} CPU workers train all parameters with ZeRO-3 over gloo"
    by_strategy = {c.strategy: c for c in candidates}
    full, offload, lora, qlora = (by_strategy[s] for s in CANDIDATES)
    limit = _limit_gb(resources)
    if limit is None:
        picked = by_strategy[strategy]
        what = {Strategy.full: f"full fine-tuning with ZeRO-3 on {workers} GPUs",
                Strategy.lora: "one GPU: LoRA adapters on the frozen bf16 model"}.get(strategy, str(strategy))
        return (f"{what} ({picked.gib_per_gpu:.1f} GiB per GPU predicted; GPU memory unknown, so nothing was "
                "checked against it: set cluster.gpu_memory_gb)")
    room = f"{MICRO_BATCH_MEMORY_SHARE:.0%} of {resources.gpu_memory_gb:.0f} GiB"
    if strategy is Strategy.full:
        return (f"full fine-tuning with ZeRO-3 fits on {workers} GPUs ({full.gib_per_gpu:.1f} GiB per GPU, "
                f"within {room})")
    if strategy is Strategy.full_offload:
        return (f"full ZeRO-3 needs {full.gib_per_gpu:.1f} GiB per GPU, more than {room}; with optimizer and "
                f"parameters offloaded to host memory it fits ({offload.gib_per_gpu:.1f} GiB)")
    if strategy is Strategy.lora:
        if full.fits:
            return (f"one GPU: LoRA adapters train on the frozen bf16 model ({lora.gib_per_gpu:.1f} GiB); full "
                    f"fine-tuning would fit too ({full.gib_per_gpu:.1f} GiB): strategy=full trains every weight")
        return (f"one GPU: full fine-tuning would need {full.gib_per_gpu:.1f} GiB, more than {room}, so LoRA "
                f"adapters train on the frozen bf16 model ({lora.gib_per_gpu:.1f} GiB)")
    return (f"one GPU: LoRA on the bf16 model would need {lora.gib_per_gpu:.1f} GiB, more than {room}, so QLoRA "
            f"trains adapters on a 4-bit base ({qlora.gib_per_gpu:.1f} GiB)")


def setting_source(key: str) -> str:
    """Where the composed value of a top-level key came from, as "on the command line", "in experiment/x.yaml"
    or "in the config" (outside a Hydra run, e.g. a test or a benchmark, or where no file can be named)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return "in the config"
    from orchestrator.runfile import source_of

    if source_of(key):  # a run file's keys reach Hydra as overrides (orchestrator/runfile.py)
        return source_of(key)
    if any(o.split("=", 1)[0].lstrip("+~") == key for o in hydra_cfg.overrides.task):
        return "on the command line"
    from importlib import resources
    from pathlib import Path

    import yaml

    for source in hydra_cfg.runtime.config_sources:  # the search path: this package's configs, hydra.searchpath
        if source.schema not in ("pkg", "file"):
            continue
        try:
            base = resources.files(source.path) if source.schema == "pkg" else Path(source.path)
        except (ImportError, TypeError, ValueError):
            continue
        for group, option in hydra_cfg.runtime.choices.items():
            if not isinstance(option, str) or group.startswith("hydra"):
                continue
            path = base.joinpath(f"{group}/{option}.yaml")
            try:
                text = path.read_text(encoding="utf-8") if path.is_file() else ""
            except OSError:
                continue
            if "@package _global_" in text and key in (yaml.safe_load(text) or {}):
                return f"in {group}/{option}.yaml"
    return "in the config"


def _fitting_hint(candidates: List[Candidate]) -> str:
    listed = ", ".join(f"{c.strategy} {c.gib_per_gpu:.1f} GiB" for c in candidates)
    return f"predicted per GPU: {listed}; use more GPUs, a smaller trainer.micro_batch_size or data.max_length"


def describe(plan: Plan, gpu_memory_gb: Optional[float]) -> str:
    """The plan as a table (candidate, predicted GiB per GPU, fits, chosen), a strategy= line, and why."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title="plan")
    for column in ("candidate", "predicted GiB/GPU", "activation ckpt", f"fits {MICRO_BATCH_MEMORY_SHARE:.0%}",
                   "chosen"):
        table.add_column(column)
    for c in plan.candidates:
        fit = {True: "yes", False: "no", None: "unknown"}[c.fits]
        table.add_row(c.strategy.value, f"{c.gib_per_gpu:.1f}", "yes" if c.checkpointing else "no",
                      fit + (f" {c.note.strip()}" if c.note else ""),
                      "<-" if c.strategy is plan.strategy else "")
    buffer = StringIO()
    if plan.candidates:
        Console(file=buffer, width=100).print(table)
    memory = f" (of {gpu_memory_gb:.0f})" if gpu_memory_gb else ""
    return (buffer.getvalue() +
            f"strategy={plan.strategy}\n"
            f"plan: {plan.num_workers} {'GPU' if plan.use_gpu else 'CPU'} worker(s), ZeRO stage {plan.zero_stage}"
            f"{', offload to host' if plan.offload else ''}, {plan.precision}"
            f"{', activation checkpointing' if plan.gradient_checkpointing else ''}, global batch "
            f"{plan.global_batch_size} = {plan.num_workers} x {plan.micro_batch_size} micro-batch x "
            f"{plan.grad_accum} accumulation"
            + (f", predicted {plan.predicted_gib_per_gpu:.1f} GiB per GPU{memory}"
               if plan.predicted_gib_per_gpu else "") +
            f"\nwhy: {plan.reason}"
            f"\nfused kernels: {'on' if plan.fused_kernels else 'off'} ({plan.fused_kernels_reason})"
            + (f"\nmicro-batch: {plan.micro_batch_reason}" if plan.micro_batch_reason else "")
            + (f"\nsteps: {plan.steps_reason}" if plan.steps_reason else "")
            + (f"\nselection: {plan.selection_reason}" if plan.selection_reason else "")
            + (f"\nlaunch: {plan.launch_reason}" if plan.launch_reason else "")
            + _describe_hyperparameters(plan.hyperparameters))


def _describe_hyperparameters(rows: dict) -> str:
    """One line per source: "optim.lr=5e-05, optim.warmup_ratio=0.1: full default: <where it comes from>"."""
    by_source: dict = {}
    for key, row in rows.items():
        by_source.setdefault(row["source"], []).append(f"{key}={row['value']}")
    return "".join(f"\nhyperparameters: {', '.join(keys)} ({source})" for source, keys in by_source.items())
