"""The run's configuration schema: typed dataclasses, registered in Hydra's ConfigStore.

Every knob has one home here, with a default that works and a comment giving its unit.
Hydra checks key names and types while composing (the schema is the base of `hydra_conf/config.yaml`);
`validate()` checks what types cannot express (ranges, combinations) and raises `UserError`.
The training loop receives the resulting `RunConfig` object and never looks at Hydra.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from orchestrator.errors import UserError


class Task(Enum):
    classification = "classification"  # encoder/decoder + classification head, label per text
    causal_lm = "causal_lm"  # next-token loss on the response tokens only


class Init(Enum):
    pretrained = "pretrained"  # load the weights at model.path
    random = "random"  # build from model.path's config.json with random weights (tests, benchmarks)


class DataFormat(Enum):
    auto = "auto"  # detected from the first row's fields
    classification = "classification"  # {"text", "label"}
    alpaca = "alpaca"  # {"instruction", "input", "output"}
    chat = "chat"  # {"messages": [{"role", "content"}]} (OpenAI) or {"conversations": [{"from", "value"}]} (ShareGPT)
    text = "text"  # {"text"} alone: continued pretraining, loss on every token


class Strategy(str, Enum):
    """A training strategy. A str (the value), so that it compares, formats and serialises as its name."""

    auto = "auto"  # the planner decides from the cluster and the model
    full = "full"  # full-parameter, DeepSpeed ZeRO-3
    full_offload = "full_offload"  # ZeRO-3 with optimizer state and parameters offloaded to CPU
    lora = "lora"  # peft LoRA adapters on the frozen model
    qlora = "qlora"  # LoRA on a 4-bit NF4 base model (GPU only, bitsandbytes)
    dora = "dora"  # weight-decomposed LoRA
    ia3 = "ia3"  # learned rescaling of keys, values and feed-forward activations
    prefix = "prefix"  # prefix tuning: trained key/value prefixes in every layer
    prompt = "prompt"  # prompt tuning: trained soft-prompt embeddings

    __str__ = str.__str__  # "lora", not "Strategy.lora" (f-strings, str(), file contents)
    __format__ = str.__format__

    @property
    def uses_adapters(self) -> bool:
        """The base model is frozen and peft adds trainable adapters (adapters.py)."""
        return self in (Strategy.lora, Strategy.qlora, Strategy.dora, Strategy.ia3, Strategy.prefix, Strategy.prompt)

    @property
    def low_rank(self) -> bool:
        """LoRA-family adapters: low-rank updates of the base weights (peft.LoraConfig)."""
        return self in (Strategy.lora, Strategy.qlora, Strategy.dora)

    @property
    def mergeable(self) -> bool:
        """peft can fold the trained adapter into the base weights for the export."""
        return self in (Strategy.lora, Strategy.dora, Strategy.ia3)

    @property
    def quantized(self) -> bool:
        """The frozen base model is loaded in 4-bit NF4 (bitsandbytes, CUDA only)."""
        return self is Strategy.qlora

    @property
    def full_parameters(self) -> bool:
        """Every parameter trains (above model.freeze_depth), no adapters."""
        return self in (Strategy.full, Strategy.full_offload)

    @property
    def offloads(self) -> bool:
        """ZeRO-3 keeps parameters and optimizer state in host memory."""
        return self is Strategy.full_offload


class Overlong(Enum):
    truncate = "truncate"  # cut rows at data.max_length and count them in the data report
    fail = "fail"  # stop before training, naming how many rows are too long


class Schedule(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class ClassWeighting(Enum):
    none = "none"
    balanced = "balanced"  # weight_c = n / (k * n_c), as scikit-learn's "balanced"
    sqrt_balanced = "sqrt_balanced"  # square root of "balanced": gentler on very rare classes


class LoggerMode(Enum):
    online = "online"  # falls back to offline when no WANDB_API_KEY is set
    offline = "offline"
    disabled = "disabled"


class Launcher(Enum):
    local = "local"  # embedded Ray, or the existing cluster at cluster.address
    rayjob = "rayjob"  # render (and submit) a KubeRay RayJob


class FusedKernels(Enum):
    auto = "auto"  # on a GPU, for the Llama/Mistral/Qwen families, when liger-kernel is installed
    on = "on"  # required: fail at once where they cannot run
    off = "off"


class Precision(str, Enum):
    """Training precision. A str (the value), as Strategy."""

    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def torch_dtype(self):
        """The weights' torch dtype; auto has none until the plan resolves it."""
        import torch  # here: the CLI composes and plans without importing torch

        if self is Precision.auto:
            raise ValueError("precision auto has no dtype: the plan resolves it to bf16 or fp32")
        return torch.bfloat16 if self is Precision.bf16 else torch.float32


@dataclass
class ModelConfig:
    path: str = "minilm"  # Hugging Face id, local directory, or "minilm" (the bundled all-MiniLM-L6-v2)
    task: Task = Task.classification
    init: Init = Init.pretrained
    tokenizer_path: Optional[str] = None  # default: model.path
    freeze_depth: int = 0  # freeze the embeddings and the bottom N transformer blocks (0 = train all)
    gradient_checkpointing: Optional[bool] = None  # recompute activations in backward; None = where memory needs it
    trust_remote_code: bool = False  # run code shipped with the model: only for models you trust
    allow_download: bool = False  # fetch a hub id that is not in the local HF cache
    config_overrides: Dict[str, Any] = field(default_factory=dict)  # applied to config.json (e.g. layers)
    # Liger Kernel's fused RMSNorm/SwiGLU/RoPE, and for causal LM the output projection fused with the loss
    # (no vocabulary-wide logits in memory); see orchestrator/kernels.py
    fused_kernels: FusedKernels = FusedKernels.auto
    # transformers' attention kernel: sdpa, flex_attention (packed rows: skips the blocks across examples), eager
    attn_implementation: str = "sdpa"


@dataclass
class MixEntry:
    """One dataset of data.mix: its share of every global batch is weight / (sum of the weights)."""

    path: str = "???"  # as data.path: a file, directory, sample:<name>, dataset id or registry name
    weight: float = 1.0  # relative share of the training rows (> 0)
    validation_path: Optional[str] = None  # as data.validation_path


@dataclass
class DataConfig:
    # a JSONL/CSV/Parquet file, a directory with train/validation files, sample:<name>, a datasets.save_to_disk
    # directory, a Hugging Face dataset id (from the local datasets cache), or a name in a datasets.yaml registry
    path: str = "sample:legal_clauses"
    mix: Optional[List[MixEntry]] = None  # several datasets of one task, drawn by weight; replaces path when set
    reference_path: Optional[str] = None  # causal LM: general text whose loss before/after shows forgetting
    packing: bool = False  # causal LM: pack training examples into rows of up to max_length tokens (no cross-attention)
    validation_path: Optional[str] = None  # default: the directory's validation file, else a split of path
    format: DataFormat = DataFormat.auto
    max_length: int = 256  # tokens; longer rows are truncated and counted (see overlong)
    overlong: Overlong = Overlong.truncate  # what to do with rows longer than max_length
    validation_fraction: float = 0.1  # share of rows held out when there is no validation file
    max_validation_rows: Optional[int] = None  # evaluate on the first N validation rows (None = all)
    chat_template: str = "auto"  # chat rows: "auto" (the tokenizer's own template, else chatml), "chatml", or Jinja
    cache: bool = True  # keep tokenized data on disk, keyed by content + tokenizer + settings; reruns skip tokenizing
    cache_dir: Optional[str] = None  # None = $ORCHESTRATOR_CACHE_DIR, else ~/.cache/orchestrator/tokenized
    # Hugging Face datasets (hub ids and save_to_disk directories; orchestrator/data/sources.py):
    split: Optional[str] = None  # the split trained on; null = train (or the dataset's only split)
    validation_split: Optional[str] = None  # null = validation/valid/val/dev if the dataset has one, else held out
    subset: Optional[str] = None  # the dataset's configuration (load_dataset's second argument), e.g. sst2 of glue
    # our field names → the dataset's columns (any source): {text: sentence, label: category} or
    # "text=sentence,label=category"; fields: text, label, instruction, input, output, messages, conversations
    columns: Any = None
    registry: Optional[str] = None  # a datasets.yaml of names (also read: next to the run file, ./, the bundled one)
    allow_download: bool = False  # download a hub id that is not in the local datasets cache (else an error)
    hub_cache: Optional[str] = None  # the datasets cache; null = $HF_DATASETS_CACHE, else $HF_HOME/datasets


@dataclass
class OptimConfig:
    # null = the default for the strategy the planner chose and the task (orchestrator/hyperparameters.py, printed
    # with the plan): LoRA trains at ten times the full fine-tuning rate, prompt tuning at a thousand
    lr: Optional[float] = None  # peak learning rate
    lr_scale: float = 1.0  # multiplies the strategy's default rate where lr is null (the tuner, +sweep=auto, sweeps it)
    weight_decay: Optional[float] = None
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: Optional[float] = None  # share of the run's optimizer steps spent warming up linearly from 0
    schedule: Optional[Schedule] = None  # decay after warmup
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    # classification: weight the loss by class rarity; null = balanced (measured best on UNFAIR-ToS), or none
    # with balanced_sampling
    class_weighting: Optional[ClassWeighting] = None
    balanced_sampling: bool = False  # classification: draw batches with classes equally likely


@dataclass
class TrainerConfig:
    # how long: epochs over the training rows (null = the task's default: 5 for classification, 3 for causal LM);
    # the optimizer steps follow from the rows, the global batch, packing and mixes, and the plan prints them
    epochs: Optional[float] = None
    epochs_scale: float = 1.0  # multiplies the task's default epochs where epochs is null (swept by +sweep=auto)
    max_steps: Optional[int] = None  # optimizer steps; when set, it wins over epochs
    # rows per worker per forward pass; null = the planner picks the largest that fits (needs global_batch_size)
    micro_batch_size: Optional[int] = 16
    grad_accum: int = 1  # micro-batches per optimizer step (ignored when global_batch_size is set)
    global_batch_size: Optional[int] = None  # rows per optimizer step; sets grad_accum = this / (workers * micro)
    eval_every: Optional[int] = None  # steps between evaluations; null = once per epoch; 0 = only before and after
    # model selection: the weights of the evaluation with the best eval/<select_metric> are exported
    select_metric: str = "auto"  # auto = macro_f1 (classification) or loss (causal LM); or any eval/* metric
    select_best: bool = True  # false: export the last weights (the best evaluation is still reported)
    patience: int = 0  # stop after this many evaluations without improvement of select_metric (0 = never)
    early_stopping: bool = False  # sweeps: stop when the validation metric is worse than the other trials' median
    early_stopping_metric: str = "loss"  # the validation metric it compares (eval/<name>), at every eval_every
    early_stopping_mode: str = "min"  # "min" (a loss) or "max" (accuracy, macro_f1)
    eval_generate_rows: int = 4  # causal LM: greedy answers to this many validation rows, ROUGE-L/BLEU (0 = off)
    eval_max_new_tokens: int = 64  # longest generated answer, in tokens
    checkpoint_every: int = 0  # steps between sharded DeepSpeed checkpoints (0 = only the final one)
    keep_checkpoints: int = 2  # newest K checkpoints kept
    # checkpoint_every's checkpoints written in the background: training waits only while the shards are copied
    # to host memory (orchestrator/checkpoint_writer.py); false = written, checksummed and copied while it waits
    async_checkpoint: bool = True
    save_final: bool = True  # the final checkpoint and Hugging Face export (false: benchmarks, smoke runs)
    max_failures: int = 2  # worker failures survived per run: all workers restart from the last checkpoint
    # after a failure, continue on fewer workers (down to min_workers) when fewer can be placed, keeping the
    # global batch by more accumulation (strategy=full / full_offload: their checkpoints are re-partitioned)
    elastic: bool = False
    min_workers: Optional[int] = None  # fewest workers an elastic run continues on; null = 1
    max_nonfinite_steps: int = 3  # consecutive steps with a NaN/inf loss before the run stops (no export)
    seed: int = 42
    precision: Precision = Precision.auto


@dataclass
class PeftConfig:
    rank: int = 16  # LoRA rank r
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / rank)
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None  # default: per architecture (peft's table)
    virtual_tokens: int = 20  # prefix / prompt tuning: trained virtual tokens
    merge: bool = True  # export LoRA/DoRA/IA3 merged into full weights (else the adapter alone)


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # existing Ray cluster ("auto" or ray://host:port); None = embedded local Ray
    nodes: Optional[int] = None  # plan for this many nodes instead of reading Ray (sizing)
    gpus: Optional[int] = None  # GPUs per node to plan for (0 = CPU workers); None = read from Ray
    gpu_memory_gb: Optional[float] = None  # memory per GPU to plan for; None = read from the GPUs
    # share of one GPU a worker takes (Ray's fractional GPUs), for one-worker runs only: below 1, small runs share
    # a GPU (a sweep gives its trials this where several fit; launch/sweep.py); the plan gets that share of its
    # memory. None = a whole GPU
    gpu_fraction: Optional[float] = None
    host_memory_gb: Optional[float] = None  # host memory per node to plan for (offload); None = read it
    cpu_workers: int = 2  # Ray workers when there is no GPU
    # checkpoints: a path every node sees, or a URI pyarrow opens (s3://, gs://, hdfs://, file://); None = the run dir
    storage_path: Optional[str] = None
    # a one-worker run's recipe in this process (Ray Train's local mode), Ray not started: no worker process to wait
    # for. auto: where nothing needs Ray (one worker, the embedded cluster, not trainer.elastic, no failure drill);
    # true: the same, or an error saying why not; false: always Ray Train's workers (plan.choose_launch)
    in_process: str = "auto"


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.online
    project: str = "orchestrator"
    entity: Optional[str] = None
    group: Optional[str] = None  # W&B group (sweeps share one)
    progress: bool = True  # rank 0's progress on the driver's console: a bar in a terminal, else a line every 30 s


@dataclass
class KubeConfig:
    """launcher=rayjob: the KubeRay RayJob that runs this config on Kubernetes (k8s/README.md).
    Secrets are never values here: only the names of Kubernetes Secrets that the pods reference."""

    namespace: str = "default"  # where the RayJob, its RayCluster and its pods live
    job_name: Optional[str] = None  # RayJob name (DNS-1035, <= 47 chars); None = <name>-<MMDD-HHMMSS>-<4 hex>
    context: Optional[str] = None  # kubeconfig context; None = the current one (inside a pod: in-cluster auth)
    image: str = "orchestrator:0.1.0"  # image with orchestrator installed (k8s/Dockerfile), the same Ray version
    image_pull_policy: str = "IfNotPresent"
    service_account: str = "orchestrator"  # the Ray pods' service account (k8s/base/rbac.yaml)
    node_pool: Optional[str] = None  # an overlay in k8s/overlays/ (a100, h100): node selector, tolerations, sizes
    wandb_secret: Optional[str] = "orchestrator-secrets"  # Secret holding key WANDB_API_KEY (null = none)
    hf_secret: Optional[str] = "orchestrator-secrets"  # Secret holding key HF_TOKEN (null = none)
    pvc: Optional[str] = "orchestrator-runs"  # ReadWriteMany claim on every pod: run dirs, checkpoints, HF cache
    storage_class: Optional[str] = None  # the claim's storage class (ReadWriteMany); null = the cluster's default
    pvc_size: str = "1Ti"  # the claim's size when it is created (a missing claim is created at submission)
    mount_path: str = "/mnt/runs"  # where the claim is mounted; run dirs are <mount_path>/<name>/<job name>
    storage_uri: Optional[str] = None  # checkpoints in an object store (s3://, gs://) instead of the claim
    shutdown_after_job_finishes: bool = True  # delete the RayCluster when the job ends
    ttl_seconds_after_finished: int = 600  # seconds the finished cluster is kept before that (needs the above)
    backoff_limit: int = 0  # retries of the whole job, each on a new RayCluster
    active_deadline_seconds: Optional[int] = None  # seconds before KubeRay fails the job; null = no limit
    head_cpu: str = "4"  # head pod (driver, Ray Train controller; no training): Kubernetes quantities
    head_memory: str = "16Gi"
    # per worker pod: CPUs and host memory per GPU it holds (per Ray Train worker for CPU workers); null = the node
    # pool's share (its pod size / its GPUs: h100 11 CPUs, 175 GiB), else 8 CPUs and 32 GiB. Offload plans
    # (full_offload) add the host memory ZeRO-3 keeps there (bf16 weights, fp32 optimizer state and gradients)
    cpu_per_gpu: Optional[float] = None
    memory_per_gpu_gb: Optional[float] = None
    worker_cpu: Optional[str] = None  # the whole worker pod's CPU request, over the above (a quantity: 64, 500m)
    worker_memory: Optional[str] = None  # the whole worker pod's memory request, over the above (a quantity: 512Gi)
    node_selector: Dict[str, str] = field(default_factory=dict)  # worker pods' node labels, over the pool's
    shm_size: Optional[str] = None  # memory-backed /dev/shm per pod (NCCL, Ray objects); null = the pool's, else 16Gi
    env: Dict[str, str] = field(default_factory=dict)  # extra environment of the job, never secrets
    follow: bool = True  # after submitting: print status and the driver's logs until the job ends
    poll_seconds: float = 5.0  # seconds between status reads while following


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    k8s: KubeConfig = field(default_factory=KubeConfig)  # launcher=rayjob only
    strategy: Strategy = Strategy.auto
    # where strategy=auto, this strategy instead of the planner's pick (auto: the pick). The tuner's alternative:
    # +sweep=auto sweeps auto,full, so that on one GPU, where the planner picks LoRA, full fine-tuning is tried too;
    # a strategy the user or the experiment names is kept (both trials are then one plan, run once)
    strategy_if_auto: Strategy = Strategy.auto
    launcher: Launcher = Launcher.local
    dry_run: bool = False  # print the plan and stop
    resume: Optional[str] = None  # "auto" (newest complete checkpoint of this name), a checkpoint or run dir
    name: str = "run"  # experiment name: W&B run name and the run directory's parent
    run_dir: str = "."  # set by the CLI to Hydra's output directory; the export goes to <run_dir>/export


def register_schema() -> None:
    """Make the schema the base of hydra_conf/config.yaml, so Hydra rejects unknown keys and bad types."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Hydra's composed config (already type-checked) → the RunConfig object, validated."""
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)
    if run.strategy is Strategy.auto:
        run.strategy = run.strategy_if_auto
    validate(run)
    return run


def config_dict(run: RunConfig) -> Dict[str, Any]:
    """Plain, JSON-able dict of the config (enums as their names), for trackers and plan files."""
    return OmegaConf.to_container(OmegaConf.structured(run), enum_to_str=True)


IN_PROCESS = ("auto", "true", "false")  # cluster.in_process


def in_process_mode(cluster: ClusterConfig) -> str:
    """cluster.in_process, lower-case: Hydra hands `true`/`false` over as booleans, which the str field keeps as
    "True"/"False"."""
    return str(cluster.in_process).lower()


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is not allowed: {allowed}")


def validate(run: RunConfig) -> None:
    """Checks that types cannot express. Each failure names the key, the value and what is allowed."""
    t, o, m, d, p = run.trainer, run.optim, run.model, run.data, run.peft
    _check(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", t.max_steps,
           "an integer >= 1, or null (trainer.epochs decides)")
    _check(t.epochs is None or (math.isfinite(t.epochs) and t.epochs > 0), "trainer.epochs", t.epochs,
           "a number > 0 (epochs over the training rows), or null (the task's default)")
    _check(t.epochs_scale > 0, "trainer.epochs_scale", t.epochs_scale, "a number > 0")
    _check(o.lr_scale > 0, "optim.lr_scale", o.lr_scale, "a number > 0")
    _check(t.patience >= 0, "trainer.patience", t.patience, "an integer >= 0 (0 = never stop early)")
    _check(bool(t.select_metric.strip()), "trainer.select_metric", t.select_metric,
           "auto, or the name of a validation metric such as macro_f1, accuracy, loss")
    validate_metric_names(run)
    _check(t.micro_batch_size is None or t.micro_batch_size >= 1, "trainer.micro_batch_size", t.micro_batch_size,
           "an integer >= 1, or null (the planner picks the largest that fits)")
    _check(t.micro_batch_size is not None or t.global_batch_size is not None, "trainer.micro_batch_size",
           t.micro_batch_size, "null only with trainer.global_batch_size set (the planner splits that batch)")
    _check(t.grad_accum >= 1, "trainer.grad_accum", t.grad_accum, "an integer >= 1")
    _check(t.global_batch_size is None or t.global_batch_size >= 1, "trainer.global_batch_size",
           t.global_batch_size, "an integer >= 1, or null")
    _check(t.eval_every is None or t.eval_every >= 0, "trainer.eval_every", t.eval_every,
           "an integer >= 0 (0 = before and after only), or null (once per epoch)")
    _check(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, "an integer >= 0")
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, "an integer >= 1")
    _check(t.max_failures >= 0, "trainer.max_failures", t.max_failures, "an integer >= 0")
    _check(t.min_workers is None or t.min_workers >= 1, "trainer.min_workers", t.min_workers,
           "an integer >= 1, or null (1)")
    _check(t.min_workers is None or t.elastic, "trainer.min_workers", t.min_workers,
           "null unless trainer.elastic=true (a run that is not elastic always runs on all its workers)")
    _check(not t.elastic or t.max_failures >= 1, "trainer.elastic", t.elastic,
           "true only with trainer.max_failures >= 1 (it continues on fewer workers when a failure restarts them)")
    _check(not t.elastic or run.strategy in (Strategy.auto, Strategy.full, Strategy.full_offload), "trainer.elastic",
           t.elastic, f"false with strategy={run.strategy.value}: only strategy=full and full_offload checkpoints can "
           "be re-partitioned onto fewer workers")
    _check(t.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps", t.max_nonfinite_steps,
           "an integer >= 1 (consecutive steps with a non-finite loss before the run stops)")
    _check(t.early_stopping_mode in ("min", "max"), "trainer.early_stopping_mode", t.early_stopping_mode, "min or max")
    _check(not t.early_stopping or t.eval_every != 0, "trainer.early_stopping", t.early_stopping,
           "true only with trainer.eval_every > 0 or null (evaluations during training: trials are compared at each)")
    _check(t.eval_generate_rows >= 0, "trainer.eval_generate_rows", t.eval_generate_rows, "an integer >= 0 (0 = off)")
    _check(t.eval_max_new_tokens >= 1, "trainer.eval_max_new_tokens", t.eval_max_new_tokens, "an integer >= 1")
    _check(o.lr is None or o.lr > 0, "optim.lr", o.lr, "a number > 0, or null (the strategy's default)")
    _check(o.warmup_ratio is None or 0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio,
           "a number in [0, 1), or null (the strategy's default)")
    _check(o.weight_decay is None or o.weight_decay >= 0, "optim.weight_decay", o.weight_decay,
           "a number >= 0, or null (the strategy's default)")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "a number >= 0 (0 = no clipping)")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
           "two numbers in [0, 1)")
    _check(m.freeze_depth >= 0, "model.freeze_depth", m.freeze_depth,
           "an integer from 0 to the model's number of layers")
    _check(d.max_length >= 8, "data.max_length", d.max_length, "an integer >= 8 (tokens)")
    _check(d.max_validation_rows is None or d.max_validation_rows >= 1, "data.max_validation_rows",
           d.max_validation_rows, "an integer >= 1 (every run evaluates on validation rows), or null for all")
    _check(0 < d.validation_fraction < 1, "data.validation_fraction", d.validation_fraction, "a number in (0, 1)")
    _check(d.chat_template in ("auto", "chatml") or "{{" in d.chat_template, "data.chat_template", d.chat_template,
           "auto, chatml, or a Jinja chat template (a string with {{ ... }})")
    _check(p.rank >= 1, "peft.rank", p.rank, "an integer >= 1")
    _check(0 <= p.dropout < 1, "peft.dropout", p.dropout, "a number in [0, 1)")
    _check(p.alpha >= 1, "peft.alpha", p.alpha, "an integer >= 1")
    _check(p.virtual_tokens >= 1, "peft.virtual_tokens", p.virtual_tokens, "an integer >= 1")
    _check(run.cluster.cpu_workers >= 1, "cluster.cpu_workers", run.cluster.cpu_workers, "an integer >= 1")
    _check(run.cluster.gpus is None or run.cluster.gpus >= 0, "cluster.gpus", run.cluster.gpus,
           "an integer >= 0 (GPUs per node), or null to read them from Ray")
    _check(run.cluster.nodes is None or run.cluster.nodes >= 1, "cluster.nodes", run.cluster.nodes,
           "an integer >= 1, or null")
    _check(run.cluster.gpu_fraction is None or 0 < run.cluster.gpu_fraction <= 1, "cluster.gpu_fraction",
           run.cluster.gpu_fraction, "a number in (0, 1], or null for a whole GPU")
    _check(in_process_mode(run.cluster) in IN_PROCESS, "cluster.in_process", run.cluster.in_process,
           "auto (in this process where one worker runs on this machine), true or false (Ray Train's workers)")
    validate_k8s(run.k8s)
    validate_mix(d)
    validate_data_source(d)
    _check(d.reference_path is None or m.task is Task.causal_lm, "data.reference_path", d.reference_path,
           "null for model.task=classification (the forgetting check measures language-model loss on text)")
    _check(not d.packing or m.task is Task.causal_lm, "data.packing", d.packing,
           "false for model.task=classification (packing applies to causal LM rows)")
    _check(not d.packing or run.strategy not in (Strategy.prefix, Strategy.prompt), "data.packing", d.packing,
           f"false with strategy={run.strategy.value} (virtual tokens shift the packed positions)")
    if m.task is Task.causal_lm:
        _check(not o.balanced_sampling, "optim.balanced_sampling", o.balanced_sampling,
               "false for model.task=causal_lm (it applies to classification)")
        _check(o.class_weighting in (None, ClassWeighting.none), "optim.class_weighting",
               getattr(o.class_weighting, "value", None), "none or null for model.task=causal_lm (it applies to "
               "classification)")


def validate_metric_names(run: RunConfig) -> None:
    """trainer.select_metric and trainer.early_stopping_metric name a metric the task's validation reports (else
    selection never finds it: the last weights are exported, and trainer.patience stops the run early), and
    early stopping compares in the metric's direction."""
    t = run.trainer
    names = ["loss", "accuracy", "macro_f1"] if run.model.task is Task.classification else ["loss", "perplexity"]
    if run.model.task is Task.causal_lm and t.eval_generate_rows:
        names += ["rougeL", "bleu", "accuracy", "macro_f1", "unparsed"]  # from generated answers
    for key, value in (("trainer.select_metric", t.select_metric), ("trainer.early_stopping_metric",
                                                                    t.early_stopping_metric)):
        name = value.strip().removeprefix("eval/")
        if key == "trainer.select_metric" and name == "auto":
            continue
        _check("/" in name or name in names, key, value, f"{'auto, or ' if key.endswith('select_metric') else ''}"
               f"a metric the validation of model.task={run.model.task.value} reports: {', '.join(names)} (a data.mix "
               "dataset's as <name>/loss)")
    if t.early_stopping:
        name = t.early_stopping_metric.strip().removeprefix("eval/").rsplit("/", 1)[-1]
        lower = name in ("loss", "perplexity") or name.endswith("_loss") or name.startswith("loss")  # as selection.py
        _check(t.early_stopping_mode == ("min" if lower else "max"), "trainer.early_stopping_mode",
               t.early_stopping_mode, f"{'min' if lower else 'max'} for trainer.early_stopping_metric="
               f"{t.early_stopping_metric} ({'lower' if lower else 'higher'} is better)")


def validate_mix(d: DataConfig) -> None:
    """data.mix: at least one dataset, each with a path and a finite weight > 0; validation per entry."""
    if d.mix is None:
        return
    _check(len(d.mix) > 0, "data.mix", d.mix, "a non-empty list of {path, weight}, or null to use data.path")
    _check(d.validation_path is None, "data.validation_path", d.validation_path,
           "null when data.mix is set (give each entry its own validation_path)")
    for i, entry in enumerate(d.mix):
        _check(bool(entry.path.strip()), f"data.mix[{i}].path", entry.path,
               "a JSONL/CSV file, a directory or sample:<name>")
        _check(math.isfinite(entry.weight) and entry.weight > 0, f"data.mix[{i}].weight", entry.weight,
               "a number > 0 (its relative share of the training rows)")


# data.columns: the fields the readers know (orchestrator/data/formats.py), each mapped to a dataset's column
DATA_FIELDS = ("text", "label", "instruction", "input", "output", "messages", "conversations")


def data_columns(value: Any, key: str = "data.columns") -> Dict[str, str]:
    """data.columns as a dict, our field → the dataset's column: a mapping, or the command line's string
    "text=sentence,label=category" (also "text:sentence"). Unknown field names are refused."""
    allowed = f"a mapping of our fields ({', '.join(DATA_FIELDS)}) to the dataset's columns, as " \
              "{text: sentence, label: category} or 'text=sentence,label=category'"
    if value is None:
        return {}
    if isinstance(value, str):
        pairs = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            ours, sep, theirs = item.replace(":", "=", 1).partition("=")
            _check(bool(sep and ours.strip() and theirs.strip()), key, value, allowed)
            pairs[ours.strip()] = theirs.strip()
        value = pairs
    _check(isinstance(value, dict) and all(isinstance(v, str) and v.strip() for v in value.values()), key, value,
           allowed)
    for ours in value:
        _check(ours in DATA_FIELDS, f"{key}.{ours}", value[ours], f"a column for one of our fields: "
               f"{', '.join(DATA_FIELDS)} (the key is our field, the value the dataset's column)")
    return {str(k): str(v).strip() for k, v in value.items()}


def validate_data_source(d: DataConfig) -> None:
    """data.columns parses; the split names are not blank."""
    data_columns(d.columns)
    for key in ("split", "validation_split", "subset", "registry", "hub_cache"):
        value = getattr(d, key)
        _check(value is None or bool(str(value).strip()), f"data.{key}", value, "a name, or null")


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")  # a Kubernetes quantity
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035: what KubeRay requires of a RayJob name


def validate_k8s(k: KubeConfig) -> None:
    """launcher=rayjob settings (checked always: they are part of every composed config)."""
    _check(bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", k.namespace)) and len(k.namespace) <= 63,
           "k8s.namespace", k.namespace, "a Kubernetes namespace name (lowercase letters, digits, '-')")
    _check(k.job_name is None or (bool(_DNS_LABEL.match(k.job_name)) and len(k.job_name) <= 47), "k8s.job_name",
           k.job_name, "null, or lowercase letters, digits and '-', starting with a letter, at most 47 characters")
    _check(k.ttl_seconds_after_finished >= 0, "k8s.ttl_seconds_after_finished", k.ttl_seconds_after_finished,
           "an integer >= 0 (seconds)")
    _check(k.shutdown_after_job_finishes or k.ttl_seconds_after_finished == 0, "k8s.ttl_seconds_after_finished",
           k.ttl_seconds_after_finished, "0 when k8s.shutdown_after_job_finishes=false (KubeRay rejects it)")
    _check(k.backoff_limit >= 0, "k8s.backoff_limit", k.backoff_limit, "an integer >= 0")
    _check(k.active_deadline_seconds is None or k.active_deadline_seconds >= 1, "k8s.active_deadline_seconds",
           k.active_deadline_seconds, "an integer >= 1 (seconds), or null for no limit")
    _check(k.poll_seconds > 0, "k8s.poll_seconds", k.poll_seconds, "a number > 0 (seconds)")
    _check(bool(k.image.strip()), "k8s.image", k.image, "a container image reference")
    _check(k.image_pull_policy in ("Always", "IfNotPresent", "Never"), "k8s.image_pull_policy",
           k.image_pull_policy, "Always, IfNotPresent or Never")
    _check(k.pvc is not None or k.storage_uri is not None, "k8s.pvc", k.pvc,
           "a PersistentVolumeClaim name unless k8s.storage_uri is set: checkpoints need storage every pod sees")
    _check(k.mount_path.startswith("/"), "k8s.mount_path", k.mount_path, "an absolute path")
    for key in ("cpu_per_gpu", "memory_per_gpu_gb"):
        value = getattr(k, key)
        _check(value is None or (math.isfinite(value) and value > 0), f"k8s.{key}", value,
               "a number > 0, or null (the node pool's share, else the default)")
    for key in ("head_cpu", "head_memory", "worker_cpu", "worker_memory", "shm_size", "pvc_size"):
        value = getattr(k, key)
        _check(value is None or bool(_QUANTITY.match(str(value))), f"k8s.{key}", value,
               "a Kubernetes quantity such as 8, 500m, 64Gi")
    for name in k.env:
        _check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)), f"k8s.env.{name}", "...",
               "an environment variable name")
        _check(not re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", name.upper()), f"k8s.env.{name}", "...",
               "no secrets in k8s.env: put them in a Kubernetes Secret (k8s/README.md, Secrets)")


def absolute_path(path: Optional[str], base: str) -> Optional[str]:
    """Ray workers run in another working directory: every user path is made absolute on the driver."""
    if path is None or path.startswith(("sample:", "builtin:")) or path == "minilm" or not _looks_local(path, base):
        return path
    return os.path.abspath(os.path.join(base, os.path.expanduser(path)))


def _looks_local(path: str, base: str) -> bool:
    """A hub id ("org/name") stays as it is unless such a directory exists locally."""
    expanded = os.path.expanduser(path)
    return os.path.isabs(expanded) or expanded.startswith(".") or os.path.exists(os.path.join(base, expanded))
