"""Parameter-efficient fine-tuning through the peft library: which adapter each strategy means, and
how an adapted model is exported (merged into full weights where peft can merge, else the adapter alone).
"""

from __future__ import annotations

import copy
import os
from typing import Optional, Union

import torch
from torch import nn

from orchestrator.config import PeftConfig, Strategy, Task
from orchestrator.errors import UserError


def quantization_config(strategy: Union[Strategy, str]):
    """QLoRA's base model: 4-bit NF4 with double quantisation, bf16 compute (bitsandbytes, CUDA only)."""
    if not Strategy(strategy).quantized:
        return None
    if not torch.cuda.is_available():
        raise UserError("strategy=qlora needs a GPU: bitsandbytes' 4-bit kernels are CUDA-only; "
                        "on CPU use strategy=lora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("strategy=qlora needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_adapter(model: nn.Module, strategy: Union[Strategy, str], cfg: PeftConfig, task: Task,
                  freeze_depth: int = 0) -> nn.Module:
    """Freeze the model and add the strategy's trainable adapter (classification heads stay trainable).
    With model.freeze_depth=k, LoRA/DoRA adapters go only into the blocks above the bottom k."""
    import peft

    strategy = Strategy(strategy)
    task_type = peft.TaskType.SEQ_CLS if task is Task.classification else peft.TaskType.CAUSAL_LM
    targets = cfg.target_modules
    if strategy.low_rank:
        if strategy.quantized:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        layers = model.config.num_hidden_layers
        config = peft.LoraConfig(task_type=task_type, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=targets, use_dora=strategy is Strategy.dora,
                                 layers_to_transform=list(range(freeze_depth, layers)) if freeze_depth else None)
    elif strategy is Strategy.ia3:
        config = peft.IA3Config(task_type=task_type, target_modules=targets,
                                feedforward_modules=_feedforward(targets))
    elif strategy is Strategy.prefix:
        config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens)
    elif strategy is Strategy.prompt:
        config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens)
    else:
        raise ValueError(strategy)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules that this architecture does not have
        raise UserError(f"strategy={strategy}: peft could not adapt {type(model).__name__}: {err}; "
                        "set peft.target_modules to the model's module names")


def _feedforward(targets: Optional[list]) -> Optional[list]:
    """IA3 needs to know which of explicit targets are feed-forward layers (scaled on their input)."""
    if targets is None:
        return None
    return [t for t in targets if any(k in t for k in ("mlp", "fc", "up_proj", "down_proj", "gate_proj",
                                                        "intermediate", "output.dense"))]


def export_adapted(model: nn.Module, strategy: Union[Strategy, str], cfg: PeftConfig, directory: str,
                   max_shard_size: str = "5GB") -> None:
    """Rank 0, weights complete: the adapter always; and, where peft can merge it, a full model too. The merge is
    made on a copy: merge_and_unload replaces the adapted layers in place, and the trained model goes on after the
    export (the optional evaluations of Recipe.finish), where under ZeRO-3 every rank must still hold the same
    layers for the collective gathers to match."""
    model.save_pretrained(os.path.join(directory, "adapter"), safe_serialization=True)
    if cfg.merge and Strategy(strategy).mergeable:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
        del merged
