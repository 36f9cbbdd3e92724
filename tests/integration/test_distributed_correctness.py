"""Distributed training equals a single-process reference on the same global batches.

2 Ray workers running DeepSpeed ZeRO-3 (gloo, fp32) train a tiny Llama on the bundled instruction data;
a plain PyTorch loop with torch.optim.AdamW replays the same global batches from the same weights.
Tolerance: 1e-5 relative per step loss (fp32: only the order of float reductions differs).
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.__main__ import execute
from orchestrator.data import encode_data, read_data
from orchestrator.data.batching import GlobalBatchSchedule, collate
from orchestrator.losses import loss_terms
from orchestrator.model import build_model, load_tokenizer
from orchestrator.optimization import make_optimizer, make_scheduler
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray
STEPS = 6
TOLERANCE = 1e-5


def overrides(model_dir, workers: int, micro: int, accum: int):
    return [*tiny_llama_run(model_dir), f"trainer.max_steps={STEPS}", "trainer.eval_generate_rows=0",
            f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={accum}", f"cluster.cpu_workers={workers}",
            "data.max_length=96", "data.max_validation_rows=8", "optim.lr=3e-3", "optim.warmup_ratio=0.2",
            "optim.grad_clip=0.5", "optim.weight_decay=0.1"]


def reference_losses(run) -> list:
    """Single process, no Ray, no DeepSpeed: the loss of each global batch, then one AdamW step."""
    torch.manual_seed(run.trainer.seed)
    tokenizer = load_tokenizer(run.model)
    data = encode_data(read_data(run.data, run.model.task, run.trainer.seed), tokenizer, run.data.max_length)
    model = build_model(run.model, None, torch.float32)
    optimizer = make_optimizer(model, run, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, run)
    global_batch = run.trainer.micro_batch_size * run.trainer.grad_accum * run.cluster.cpu_workers
    schedule = GlobalBatchSchedule(len(data.train), global_batch, run.trainer.seed)
    losses = []
    for step in range(run.trainer.max_steps):
        batch = collate([data.train[i] for i in schedule.global_batch(step)], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        loss_sum, weight = loss_terms(model(**batch).logits, labels, run.model.task)
        loss = loss_sum / weight
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, tiny_llama_dir, tmp_path_factory):
    run = compose_run(overrides(tiny_llama_dir, workers=2, micro=4, accum=1), tmp_path_factory.mktemp("two"))
    return run, execute(run)


def test_two_zero3_workers_match_a_single_process_reference(two_worker_run):
    run, metrics = two_worker_run
    distributed = metrics["train/loss_history"]
    reference = reference_losses(run)
    assert len(distributed) == STEPS
    assert reference[-1] < reference[0]  # it trains, so equal losses mean equal updates
    torch.testing.assert_close(torch.tensor(distributed), torch.tensor(reference), rtol=TOLERANCE, atol=0)


def test_one_worker_with_accumulation_matches_two_workers(two_worker_run, tiny_llama_dir, tmp_path):
    _, two_workers = two_worker_run
    run = compose_run(overrides(tiny_llama_dir, workers=1, micro=4, accum=2), tmp_path)
    one_worker = execute(run)
    torch.testing.assert_close(torch.tensor(one_worker["train/loss_history"]),
                               torch.tensor(two_workers["train/loss_history"]), rtol=TOLERANCE, atol=0)
