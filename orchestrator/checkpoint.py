"""Sharded DeepSpeed checkpoints through Ray Train, and the consolidated Hugging Face export.

Every rank writes its own ZeRO-3 shard into a local directory and hands it to `ray.train.report`;
Ray merges the ranks' files into one checkpoint under the run's storage path and keeps the newest K.
The export gathers the full weights onto rank 0, which alone writes safetensors + config + tokenizer.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Optional

import ray.train

DEEPSPEED_DIR = "deepspeed"  # inside a checkpoint: every rank's ZeRO shards
EXPORT_DIR = "hf"  # inside the final checkpoint: the consolidated Hugging Face model
TAG = "zero"


def save_and_report(engine, step: int, metrics: Dict[str, float], export: Optional[tuple] = None) -> None:
    """Collective: all ranks call it. `export=(model, tokenizer, strategy, peft config)` adds the
    consolidated Hugging Face model (and, for adapter strategies, the adapter)."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=TAG, client_state={"step": step})
        if export is not None:
            export_hf(engine, *export, os.path.join(directory, EXPORT_DIR))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def export_hf(engine, model, tokenizer, strategy: str, peft_config, directory: str) -> None:
    from orchestrator.adapters import ADAPTER_STRATEGIES, export_adapted

    if strategy in ADAPTER_STRATEGIES:
        with gathered(engine, model):  # adapters and base complete on every rank for the merge
            if engine.global_rank == 0:
                export_adapted(model, strategy, peft_config, directory)
                tokenizer.save_pretrained(directory)
        return
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full weights on rank 0 only
    if engine.global_rank == 0:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(directory)


def gathered(engine, model):
    """ZeRO-3: gather every partitioned parameter (collective); without ZeRO: nothing to do."""
    if not hasattr(engine, "zero_optimization_stage") or engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    # modifier_rank=None: the merge on rank 0 is written out, not kept, so nothing needs broadcasting back
    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def restore(engine, checkpoint: Optional[ray.train.Checkpoint]) -> int:
    """Load model, optimizer and scheduler state; returns the step to continue from (0 without one)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=TAG)
    return int(client_state["step"])
