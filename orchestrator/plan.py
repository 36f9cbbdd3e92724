"""Resources + config → Plan: which strategy, how many workers, what batch layout, and why.

A pure function: the same Plan drives a local run, a RayJob manifest and each sweep trial.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from orchestrator.config import Precision, RunConfig, Strategy
from orchestrator.errors import UserError


@dataclass
class ClusterResources:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: Optional[float]  # per GPU; None when unknown or no GPU
    cpus: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Plan:
    strategy: str  # a Strategy value, never "auto"
    num_workers: int
    use_gpu: bool
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int  # rows per optimizer step = workers * micro * accumulation
    precision: str  # "bf16" or "fp32"
    zero_stage: int
    reason: str  # one sentence: why this plan

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def make_plan(run: RunConfig, resources: ClusterResources) -> Plan:
    use_gpu = resources.gpus > 0
    num_workers = resources.gpus if use_gpu else run.cluster.cpu_workers
    strategy = run.strategy
    if strategy is Strategy.auto:
        strategy = Strategy.full
        where = (f"{resources.gpus} GPU(s) on {resources.nodes} node(s): one Ray worker per GPU"
                 if use_gpu else f"no GPU: {num_workers} CPU workers over gloo")
        reason = f"full-parameter ZeRO-3 partitions weights, gradients and optimizer state over the workers; {where}"
    else:
        reason = f"strategy={strategy.value} was set on the command line"
    micro = run.trainer.micro_batch_size
    accum = run.trainer.grad_accum
    if run.trainer.global_batch_size is not None:
        per_pass = num_workers * micro
        if run.trainer.global_batch_size % per_pass:
            raise UserError(f"trainer.global_batch_size={run.trainer.global_batch_size} is not allowed: it must be "
                            f"a multiple of workers x micro-batch = {num_workers} x {micro} = {per_pass}")
        accum = run.trainer.global_batch_size // per_pass
    precision = run.trainer.precision
    if precision is Precision.auto:
        precision = Precision.bf16 if use_gpu else Precision.fp32
    return Plan(strategy=strategy.value, num_workers=num_workers, use_gpu=use_gpu, micro_batch_size=micro,
                grad_accum=accum, global_batch_size=num_workers * micro * accum, precision=precision.value,
                zero_stage=3, reason=reason)


def describe(plan: Plan) -> str:
    return (f"strategy={plan.strategy}\n"
            f"plan: {plan.num_workers} {'GPU' if plan.use_gpu else 'CPU'} worker(s), ZeRO stage {plan.zero_stage}, "
            f"{plan.precision}, global batch {plan.global_batch_size} = {plan.num_workers} workers x "
            f"{plan.micro_batch_size} micro-batch x {plan.grad_accum} accumulation\n"
            f"why: {plan.reason}")
