"""Plan.for_workers: the same global batch on another number of workers (resume on other workers, elastic restart)."""

from __future__ import annotations

import pytest

from orchestrator.config import Precision, Strategy
from orchestrator.errors import UserError
from orchestrator.plan import Plan


def a_plan(strategy=Strategy.full, workers=2, micro=2, accum=1) -> Plan:
    return Plan(strategy=strategy, num_workers=workers, use_gpu=False, micro_batch_size=micro, grad_accum=accum,
                global_batch_size=workers * micro * accum, precision=Precision.fp32, zero_stage=3, offload=False,
                gradient_checkpointing=False, predicted_gib_per_gpu=None, reason="test", max_steps=12)


def test_fewer_or_more_workers_keep_the_global_batch_by_accumulation():
    plan = a_plan(workers=2, micro=2, accum=2)  # 8 rows per step
    one = plan.for_workers(1)
    assert (one.num_workers, one.micro_batch_size, one.grad_accum, one.global_batch_size) == (1, 2, 4, 8)
    four = plan.for_workers(4)
    assert (four.num_workers, four.grad_accum, four.global_batch_size) == (4, 1, 8)
    assert four.max_steps == plan.max_steps and plan.num_workers == 2  # the rest kept; the original unchanged
    assert plan.for_workers(2) is plan


def test_what_cannot_keep_the_run_is_refused():
    with pytest.raises(UserError, match=r"global batch of 8 rows cannot be kept on 3 worker\(s\) x micro-batch 2"):
        a_plan(workers=2, micro=2, accum=2).for_workers(3)
    with pytest.raises(UserError, match=r"strategy=lora continues only on the 2 worker\(s\) it started on"):
        a_plan(strategy=Strategy.lora).for_workers(1)
