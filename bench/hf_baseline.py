"""Baseline of the GPU throughput benchmark: Hugging Face `Trainer`, the path most users take, on exactly the rows
our orchestrator trains on (read, tokenized, packed and collated by orchestrator.data), timed per step.

Modes:
  zero3  Trainer + DeepSpeed ZeRO-3 ("auto" config, as users write it), one process per GPU under torchrun
  lora   Trainer + peft LoRA on one process, no DeepSpeed; rank / alpha / dropout / targets default to the
         orchestrator's strategy=lora (orchestrator.config.PeftConfig: targets None = peft's table per architecture)

Timing: a callback synchronises CUDA and reads perf_counter at every step's begin and end. Trainer fetches and
collates a step's batch (and all-reduces its token count) before on_step_begin, whereas our loop times that inside
its step; so step_seconds run from the previous step's end to this step's end (the first from its begin), and
step_compute_seconds from begin to end. tokens_per_s_per_gpu = global non-padding tokens of the timed steps (after
--warmup) / their seconds / world size. losses: the loss Trainer backpropagates each step, averaged over ranks (the
global per-token mean, as our loop reports it). Rank 0 writes the JSON, atomically.

GPU:  torchrun --nproc_per_node=2 bench/hf_baseline.py --mode zero3 --model builtin:llama-3.2-1b --tokenizer DIR \
        --data DIR --seq 4096 --micro-batch 1 --steps 20 --warmup 3 --layout packed --out zero3.json
      python bench/hf_baseline.py --mode lora --model builtin:llama-3.1-8b --tokenizer DIR --data DIR \
        --seq 4096 --micro-batch 1 --steps 20 --warmup 3 --layout packed --out lora.json
CPU:  OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 bench/hf_baseline.py \
        --mode zero3 --device cpu --model builtin:tiny-llama --seq 128 ...  (gloo; DS_ACCELERATOR=cpu is set here)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (after the path: orchestrator is imported from this checkout)
import torch.distributed as dist  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import (  # noqa: E402  (none of these imports deepspeed: DS_ACCELERATOR is set in main first)
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from orchestrator.config import DataConfig, PeftConfig, Task  # noqa: E402
from orchestrator.data import encode_data, read_data  # noqa: E402
from orchestrator.data.batching import collate, model_inputs, pack_examples  # noqa: E402
from orchestrator.model import resolve_model_path  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["zero3", "lora"], required=True)
    p.add_argument("--model", default="builtin:llama-3.2-1b")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the warmup")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layout", choices=["packed", "padded"], default="packed")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--lora-rank", type=int, default=PeftConfig.rank)
    p.add_argument("--lora-alpha", type=int, default=PeftConfig.alpha)
    p.add_argument("--lora-dropout", type=float, default=PeftConfig.dropout)
    p.add_argument("--lora-targets", default=None, help="comma-separated modules; default: as the orchestrator")
    p.add_argument("--launched-at", type=float, default=STARTED, help="time.time() when the caller launched this")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def deepspeed_config(device: str) -> dict:
    """What users write for ZeRO-3: Trainer fills the "auto" values from TrainingArguments and the model."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "overlap_comm": device == "cuda", "contiguous_gradients": True,
                                  "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto",
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "zero_allow_untested_optimizer": True}


def training_arguments(args, ds_config) -> TrainingArguments:
    cuda = args.device == "cuda"
    checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "hf_baseline"),  # nothing is saved there
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.warmup + args.steps, learning_rate=1e-5,
        lr_scheduler_type="constant", bf16=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
        **(checkpointing if args.grad_ckpt else {}),  # non-reentrant, as our build_model
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=1_000_000, dataloader_num_workers=0,
        disable_tqdm=True, remove_unused_columns=False, deepspeed=ds_config, use_cpu=not cuda and not ds_config,
        accelerator_config={"use_configured_state": bool(ds_config and not cuda)})  # see cpu_deepspeed_state


def cpu_deepspeed_state() -> None:
    """ZeRO-3 on CPU. With use_cpu=True accelerate drops the DeepSpeed plugin (plain gloo DDP, model unpartitioned);
    without it, TrainingArguments passes accelerate no backend for DeepSpeed and accelerate picks one only for a
    GPU-like device, so Trainer would see world size 1 and DeepSpeed 2 (its batch-size check fails). So set up
    accelerate's state ourselves, DeepSpeed's comm over gloo, and have TrainingArguments use it
    (accelerator_config use_configured_state)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def training_rows(args, tokenizer) -> list:
    """Our pipeline, so the rows are identical: read, encode (no packing there), then pack once if asked."""
    raw = read_data(DataConfig(path=args.data, max_length=args.seq, cache=False), Task.causal_lm, seed=0)
    train = encode_data(raw, tokenizer, args.seq).train  # DataConfig.packing is False: unpacked examples
    return pack_examples(train, args.seq) if args.layout == "packed" else train


class Collator:
    """collate() plus model_inputs()' packed adjustments; counts each micro-batch's non-padding tokens in order
    (the dataloader runs in this process, so the i-th call is the i-th step's batch)."""

    def __init__(self, rows: list, pad_token_id: int):
        self.rows, self.pad_token_id, self.tokens = rows, pad_token_id, []

    def __call__(self, indices: list) -> dict:
        batch = collate([self.rows[i % len(self.rows)] for i in indices], self.pad_token_id)  # cycle
        self.tokens.append(int(batch["attention_mask"].sum()))
        return {**model_inputs(batch), "labels": batch["labels"]}


def build_model(args):
    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)  # the same random weights every run
    # zero3: the live HfDeepSpeedConfig (held by TrainingArguments) makes from_config build under zero.Init, which
    # places the shards itself; lora: built right on the GPU (initialising there takes seconds)
    with torch.device(args.device) if args.mode == "lora" else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def add_lora(model, args) -> tuple:
    import peft

    targets = args.lora_targets.split(",") if args.lora_targets else PeftConfig.target_modules
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                                       lora_dropout=args.lora_dropout, target_modules=targets,
                                                       task_type="CAUSAL_LM"))
    used = model.peft_config["default"]  # peft fills targets from its per-architecture table when None
    return model, {"rank": used.r, "alpha": used.lora_alpha, "dropout": used.lora_dropout,
                   "target_modules": sorted(used.target_modules)}


def count_params(model) -> dict:
    """Unique parameters (parameters() skips tied duplicates); under ZeRO-3 each holds a shard, ds_numel is whole."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return {"total": sum(n for n, _ in sizes), "trainable": sum(n for n, grad in sizes if grad)}


class BaselineTrainer(Trainer):
    """Trainer logs the loss only every logging_steps: keep every step's (one sync, as our loop has)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = []

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)  # rows in order (Trainer's default shuffles)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append((result[0] if return_outputs else result).detach().float().item())
        return result


class StepTimer(TrainerCallback):
    def __init__(self, cuda: bool):
        self.cuda, self.begins, self.ends, self.first_step_at = cuda, [], [], None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # the step's kernels are done, not just queued
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.first_step_at = self.first_step_at or time.time()
        self.begins.append(self._now())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())


def reduce_over_ranks(values: list, op: str) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def summarise(args, timer: StepTimer, tokens: list, losses: list, extra: dict, world_size: int) -> dict:
    import deepspeed
    import peft
    import transformers

    ends, accum = timer.ends, args.grad_accum
    step_seconds = [ends[i] - (ends[i - 1] if i else timer.begins[0]) for i in range(len(ends))]
    # tokens and losses come per micro-batch: an optimizer step is `accum` of them in a row
    tokens = [float(sum(tokens[i * accum:(i + 1) * accum])) for i in range(len(ends))]
    losses = [sum(losses[i * accum:(i + 1) * accum]) for i in range(len(losses) // accum)]
    global_tokens = reduce_over_ranks(tokens, "SUM")
    # a rank's Trainer loss is its token-loss sum / the global token count (over the accumulated micro-batches)
    # x world size (average_tokens_across_devices): the mean over ranks of the sum over micro-batches is the
    # global per-token loss
    losses = [x / world_size for x in reduce_over_ranks(losses, "SUM")]
    timed = slice(args.warmup, len(ends))
    memory = [None, None]
    if args.device == "cuda":
        memory = reduce_over_ranks([torch.cuda.max_memory_allocated() / 2**30,
                                    torch.cuda.max_memory_reserved() / 2**30], "MAX")
    return {"mode": args.mode, "layout": args.layout, "world_size": world_size, "model": args.model,
            "model_path": resolve_model_path(args.model), "device": args.device, "seq": args.seq,
            "micro_batch": args.micro_batch, "grad_accum": accum, "grad_ckpt": args.grad_ckpt, "warmup": args.warmup,
            "steps": args.steps,
            **extra, "step_seconds": step_seconds, "step_tokens": global_tokens,
            "step_compute_seconds": [e - b for b, e in zip(timer.begins, ends)],
            "tokens_per_s_per_gpu": sum(global_tokens[timed]) / sum(step_seconds[timed]) / world_size,
            "step_s": sum(step_seconds[timed]) / len(step_seconds[timed]),
            "max_allocated_gib": memory[0], "max_reserved_gib": memory[1], "losses": losses,
            "command_to_first_step_s": timer.first_step_at - args.launched_at,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "deepspeed": deepspeed.__version__, "peft": peft.__version__}}


def write_json(path: str, result: dict) -> None:
    """Atomically (tmp file + rename): a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: it would probe for GPUs and warn
    ds_config = deepspeed_config(args.device) if args.mode == "zero3" else None
    if ds_config and args.device == "cpu":
        cpu_deepspeed_state()
    # TrainingArguments before the model, the order the transformers docs give ZeRO-3 users: with deepspeed= it
    # creates and holds (.hf_deepspeed_config) the HfDeepSpeedConfig that from_config reads; it also starts the
    # process group
    training_args = training_arguments(args, ds_config)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = training_rows(args, tokenizer)
    model = build_model(args)
    extra = {"deepspeed_config": ds_config}
    if args.mode == "lora":
        model, extra["lora"] = add_lora(model, args)
    else:  # the point of HfDeepSpeedConfig: no rank ever held the whole model
        extra["built_partitioned"] = all(hasattr(p, "ds_id") for p in model.parameters())
    extra["n_params"] = count_params(model)
    timer, collator = StepTimer(args.device == "cuda"), Collator(rows, tokenizer.pad_token_id)
    world_size = training_args.world_size
    # row indices; the collator cycles the rows
    needed = training_args.max_steps * args.micro_batch * args.grad_accum * world_size
    trainer = BaselineTrainer(model=model, args=training_args, train_dataset=list(range(needed)),
                              data_collator=collator, callbacks=[timer])
    trainer.train()
    result = summarise(args, timer, collator.tokens, trainer.losses, extra, world_size)
    if training_args.process_index == 0:
        write_json(args.out, result)
        print(f"hf_baseline {args.mode} {args.layout}: {result['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, "
              f"step {result['step_s']:.3f} s -> {args.out}")


if __name__ == "__main__":
    main()
