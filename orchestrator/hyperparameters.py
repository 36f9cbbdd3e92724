"""Hyperparameters that follow the strategy: what a run trains with where the user set nothing.

LoRA wants a learning rate ten times that of full fine-tuning, prompt tuning a thousand times; one default for
all would make the planner's PEFT fallback barely move (issue 13: 30 LoRA steps at the full fine-tuning rate
moved a Llama's loss from 12.21 to 12.22). So `optim.lr`, `optim.warmup_ratio`, `optim.weight_decay`,
`optim.schedule`, `optim.class_weighting` and `trainer.epochs` are null in the schema, and `resolve` fills each
null from the table below for the strategy the planner chose and the task. A value the user sets always wins.
The plan prints every value with where it came from, and plan.json holds them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

from orchestrator.config import ClassWeighting, RunConfig, Schedule, Strategy, Task


@dataclass(frozen=True)
class Defaults:
    lr: float  # peak learning rate
    warmup_ratio: float  # share of the steps warming up linearly from 0
    schedule: Schedule  # decay after warmup
    weight_decay: float
    source: str  # where the numbers come from


# (kind of training, task) -> defaults. Sources are public example configs and papers; the encoder classifier's
# were measured on UNFAIR-ToS (bench/RESULTS.md, "Imbalanced classification: what generalises").
_FULL_CLASSIFIER = Defaults(1e-4, 0.1, Schedule.linear, 0.0,
                            "measured: MiniLM on UNFAIR-ToS at global batch 32, 5 seeds (bench/RESULTS.md)")
_FULL_CAUSAL_LM = Defaults(1e-5, 0.1, Schedule.cosine, 0.0,
                           "LLaMA-Factory examples/train_full/llama3_full_sft.yaml (1e-5, warmup 0.1, cosine)")
_LORA_CAUSAL_LM = Defaults(1e-4, 0.1, Schedule.cosine, 0.0,
                           "LLaMA-Factory examples/train_lora/llama3_lora_sft.yaml (1e-4, warmup 0.1, cosine)")
# The LoRA paper's RoBERTa-base GLUE rate (4e-4..5e-4) left MiniLM's classifier at macro-F1 0.29 on unseen
# UNFAIR-ToS clauses through our CLI on one GPU; 2e-3 gave 0.62 (4e-3 diverged): a small encoder's rank-16
# adapters on query/value need a larger step than RoBERTa-base's.
_LORA_CLASSIFIER = Defaults(2e-3, 0.1, Schedule.linear, 0.0,
                            "measured: MiniLM + LoRA r16 on UNFAIR-ToS, 1 x H200, 3 seeds (bench/RESULTS.md); "
                            "the LoRA paper's 5e-4 (RoBERTa-base, GLUE) undertrained it")
TABLE: Dict[Tuple[str, Task], Defaults] = {
    ("full", Task.classification): _FULL_CLASSIFIER,
    ("full", Task.causal_lm): _FULL_CAUSAL_LM,
    ("lora", Task.causal_lm): _LORA_CAUSAL_LM,
    ("lora", Task.classification): _LORA_CLASSIFIER,
    ("qlora", Task.causal_lm): Defaults(2e-4, 0.03, Schedule.constant, 0.0,
                                        "QLoRA paper (Dettmers et al. 2023): 2e-4 for 7B-13B, constant, warmup 0.03"),
    ("ia3", Task.causal_lm): Defaults(3e-3, 0.06, Schedule.linear, 0.0,
                                      "(IA)3 paper (Liu et al. 2022, T-Few): 3e-3, warmup 0.06, linear"),
    ("prefix", Task.causal_lm): Defaults(1e-2, 0.0, Schedule.linear, 0.0,
                                         "peft's prefix tuning guide: 1e-2, linear"),
    ("prompt", Task.causal_lm): Defaults(3e-2, 0.0, Schedule.linear, 0.0,
                                         "peft's prompt tuning guide for causal LM: 3e-2, linear"),
}
# training length and imbalance handling depend on the task alone
EPOCHS = {Task.classification: (5.0, "measured: 5 epochs beat 4 on UNFAIR-ToS (bench/RESULTS.md)"),
          Task.causal_lm: (3.0, "LLaMA-Factory's SFT examples (3 epochs)")}
CLASS_WEIGHTING = (ClassWeighting.balanced, "measured on UNFAIR-ToS against none, sqrt_balanced and balanced "
                                            "sampling, 5 seeds each (bench/RESULTS.md)")


def defaults_for(strategy: Strategy, task: Task) -> Defaults:
    kind = "full" if strategy.full_parameters else strategy.value
    if kind == "dora":
        kind = "lora"  # DoRA trains as LoRA does (Liu et al. 2024 use LoRA's rates)
    if (kind, task) not in TABLE:  # e.g. QLoRA/IA3/prefix/prompt on a classifier: their causal LM rates
        kind_task = (kind, Task.causal_lm) if (kind, Task.causal_lm) in TABLE else ("lora", task)
        return TABLE[kind_task]
    return TABLE[(kind, task)]


@dataclass
class Resolved:
    """One hyperparameter as the run uses it, and why (printed with the plan, kept in plan.json)."""

    key: str
    value: object
    source: str  # "set" (by the user) or where the default comes from


def resolve(run: RunConfig, strategy: Strategy) -> Dict[str, Resolved]:
    """The values for the nulls of `run` (not changed here), with their sources; set values are listed as set."""
    task = run.model.task
    chosen = defaults_for(strategy, task)
    rows = {}

    def pick(key: str, value: Optional[object], default: object, source: str) -> None:
        rows[key] = Resolved(key, value, "set") if value is not None else Resolved(key, default, source)

    default_source = f"{strategy.value} default: {chosen.source}"
    scaled = f" x optim.lr_scale={run.optim.lr_scale:g}" if run.optim.lr_scale != 1 else ""
    pick("optim.lr", run.optim.lr, chosen.lr * run.optim.lr_scale, default_source + scaled)
    pick("optim.warmup_ratio", run.optim.warmup_ratio, chosen.warmup_ratio, default_source)
    pick("optim.schedule", run.optim.schedule, chosen.schedule, default_source)
    pick("optim.weight_decay", run.optim.weight_decay, chosen.weight_decay, default_source)
    if task is Task.classification:
        if run.optim.class_weighting is None and run.optim.balanced_sampling:
            # balanced batches already: weighting them again would overcorrect
            rows["optim.class_weighting"] = Resolved("optim.class_weighting", ClassWeighting.none,
                                                     "optim.balanced_sampling=true")
        else:
            pick("optim.class_weighting", run.optim.class_weighting, CLASS_WEIGHTING[0],
                 f"classification default: {CLASS_WEIGHTING[1]}")
    if run.trainer.max_steps is None:
        epochs, source = EPOCHS[task]
        scale = run.trainer.epochs_scale
        pick("trainer.epochs", run.trainer.epochs, epochs * scale,
             f"{task.value} default: {source}" + (f" x trainer.epochs_scale={scale:g}" if scale != 1 else ""))
    return rows


def apply(run: RunConfig, resolved: Dict[str, Resolved]) -> None:
    """Write the resolved values into the run, so that the workers, the model card and W&B see what ran."""
    for row in resolved.values():
        section, name = row.key.split(".")
        setattr(getattr(run, section), name, row.value)


def as_json(resolved: Dict[str, Resolved]) -> Dict[str, dict]:
    return {key: {**asdict(row), "value": getattr(row.value, "value", row.value)} for key, row in resolved.items()}


@dataclass
class TrainingLength:
    """How long the run trains, in optimizer steps, and how it was worked out."""

    max_steps: int
    steps_per_epoch: int  # global batches to see every training row once (at least 1)
    reason: str


def training_length(run: RunConfig, epochs: Optional[float], train_rows: Optional[int],
                    global_batch_size: int) -> TrainingLength:
    """trainer.max_steps where set; else epochs x ceil(training rows / global batch). Training rows are examples
    after packing (data.packing) and, for data.mix, all datasets' rows together (rows are drawn by weight, so an
    epoch is a draw of as many rows as the mix holds)."""
    rows = train_rows or global_batch_size
    steps_per_epoch = max(1, -(-rows // global_batch_size))
    if run.trainer.max_steps is not None:
        steps = run.trainer.max_steps
        return TrainingLength(steps, steps_per_epoch, f"trainer.max_steps={steps} (set; {steps / steps_per_epoch:.2g} "
                                                      f"epochs of {rows} rows)")
    steps = max(1, round(epochs * steps_per_epoch))
    return TrainingLength(steps, steps_per_epoch, f"{epochs:g} epochs x {steps_per_epoch} steps (ceil of {rows} "
                                                  f"training rows / global batch {global_batch_size}) = {steps} steps")


def selection_metric(run: RunConfig) -> str:
    """trainer.select_metric=auto: macro-F1 for classification (accuracy rewards answering the majority class),
    validation loss for causal LM."""
    if run.trainer.select_metric != "auto":
        return run.trainer.select_metric.removeprefix("eval/")
    return "macro_f1" if run.model.task is Task.classification else "loss"
