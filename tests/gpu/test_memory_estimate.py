"""The planner's memory estimate (orchestrator/memory.py, as plan.json's predicted_gib_per_gpu) against the peak a
real run measured (metrics.json: gpu/max_reserved_gib, the memory the CUDA caching allocator held at its most,
which is what runs out; gpu/max_allocated_gib is recorded beside it), for full fine-tuning and LoRA on one GPU.

The Llama-3.2-1B shape (random weights: model.init=random, no download) is big enough for the estimate to matter:
full ZeRO-3 on one GPU holds about 20 GB of weights, gradients and optimizer state; LoRA runs 4 packed rows of
2048 tokens, so that its activations (about 11 GB) outweigh the estimate's fixed 1.5 GiB. Packed rows (data.packing)
give every step exactly the planned tokens; 3 steps; evaluation on one short validation row; no export
(trainer.save_final=false). The target, from issue 3 and bench/RESULTS.md: within 15% either way.
Each run trains on a Ray Train worker (cluster.in_process=false): a process of its own, as a user's run is, so that
the peak is the run's alone. In the test session's process the same LoRA run measured 11.6 GiB first, 15.5 GiB after
the full run, and 34 GiB in the suite of 2026-12-01 (the earlier runs' memory is freed, 64 MiB left, but the CUDA
allocator and the libraries' state are not as a fresh process has them).
Skipped without a CUDA GPU.
"""

from __future__ import annotations

import pytest

from tests.gpu import support

if support.no_gpu_reason():
    pytest.skip(support.no_gpu_reason(), allow_module_level=True)


SHARE = 0.15
MODEL = "builtin:llama-3.2-1b"
CASES = {  # strategy: (tokens per row, rows per micro-batch)
    "full": (512, 4),
    "lora": (2048, 4),
}


@pytest.mark.parametrize("strategy", list(CASES))
def test_the_memory_estimate_is_within_15_percent_of_the_measured_peak(strategy, train, gpu_assets, record):
    seq, micro = CASES[strategy]
    trained = train(f"memory_{strategy}", [
        "model=tiny_llama", f"model.path={MODEL}", "model.init=random", f"model.tokenizer_path={gpu_assets.tokenizer}",
        "model.gradient_checkpointing=false", f"data.path={gpu_assets.long_data}", "data.format=text",
        "data.packing=true", f"data.max_length={seq}", "data.max_validation_rows=1", f"strategy={strategy}",
        "trainer.max_steps=3", f"trainer.micro_batch_size={micro}", "trainer.eval_every=0",
        "trainer.eval_generate_rows=0", "trainer.save_final=false", "optim.lr=1e-5", "optim.warmup_ratio=0",
        "logger.mode=disabled", "cluster.in_process=false"])
    plan, metrics = trained.plan, trained.metrics
    predicted = plan["predicted_gib_per_gpu"]
    reserved, allocated = metrics.get("gpu/max_reserved_gib"), metrics.get("gpu/max_allocated_gib")
    check = support.memory_within(predicted, reserved, SHARE)
    against_allocated = support.memory_within(predicted, allocated, SHARE) if allocated else None
    print(f"memory {strategy}: {check}; against max allocated {allocated:.2f} GiB: "
          f"{against_allocated.error:+.1%}; plan: {plan['strategy']}, fused kernels {plan['fused_kernels']}, "
          f"activation checkpointing {plan['gradient_checkpointing']}, micro-batch {plan['micro_batch_size']}")
    record(strategy=strategy, predicted_gib=predicted, reserved_gib=reserved, allocated_gib=allocated,
           error_vs_reserved=check.error, error_vs_allocated=against_allocated.error if against_allocated else None,
           fused_kernels=plan["fused_kernels"], seconds=trained.seconds)
    assert plan["strategy"] == strategy and not plan["gradient_checkpointing"], plan
    assert check.ok, f"strategy={strategy} ({MODEL}, {micro} x {seq} tokens): {check}"
