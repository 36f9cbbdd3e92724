"""The per-worker recipe, top to bottom. Ray Train runs one copy per worker; DeepSpeed does the rest.

    data → model (partitioned by ZeRO-3 as it is built) → deepspeed.initialize → restore →
    evaluate → for each step: forward, backward, step, log (checkpoint / evaluate every k) →
    evaluate → checkpoint + consolidated export → report
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
import warnings
from typing import Any, Dict, Optional

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator import early_stopping, kernels
from orchestrator.adapters import ADAPTER_STRATEGIES, apply_adapter
from orchestrator.checkpoint import (
    checkpoint_info,
    metrics_only,
    newest_complete_checkpoint,
    report_metrics_only,
    restore,
    save_and_report,
    storage_root,
)
from orchestrator.config import RunConfig, Task, config_dict
from orchestrator.data import encode_data, read_data
from orchestrator.data.batching import GlobalBatchSchedule, collate, mix_row_weights, model_inputs
from orchestrator.deepspeed_config import deepspeed_config
from orchestrator.files import write_json_atomically
from orchestrator.generation_eval import generation_report
from orchestrator.losses import class_weights_for, loss_terms, target_weight
from orchestrator.metrics import evaluate
from orchestrator.model import build_model, load_tokenizer, read_model_config
from orchestrator.plain_engine import PlainEngine
from orchestrator.plan import Plan
from orchestrator.tracking import Tracker


def train_loop(config: Dict[str, Any]) -> None:
    run: RunConfig = config["run"]
    plan: Plan = config["plan"]
    if not plan.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # say it, rather than have DeepSpeed warn that it guessed
    import deepspeed
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.utils.logger.setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines; our progress says enough
    quiet_ray_report_lines()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
    transformers.logging.set_verbosity_error()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopt the process group Ray set up
    torch.manual_seed(run.trainer.seed)
    task = run.model.task

    # data: every rank reads and encodes the same rows; the schedule decides who trains on which
    tokenizer = load_tokenizer(run.model)
    data = encode_data(read_data(run.data, task, run.trainer.seed), tokenizer, run.data.max_length)
    class_weights = None
    class_of_row = None
    if task is Task.classification:
        class_of_row = [e.target for e in data.train]
        counts = torch.bincount(torch.tensor(class_of_row), minlength=len(data.labels))
        class_weights = class_weights_for(counts, run.optim.class_weighting.value)
    sample_classes = class_of_row if run.optim.balanced_sampling else None
    row_weights = (mix_row_weights(data.train_source, [p.weight for p in data.parts], sample_classes)
                   if data.parts else None)  # data.mix: each dataset's share of every batch follows its weight
    schedule = GlobalBatchSchedule(len(data.train), plan.global_batch_size, run.trainer.seed, sample_classes,
                                   row_weights)
    lengths = [len(e.input_ids) for e in data.train]
    packed_length = run.data.max_length if run.data.packing else None  # one shape per step (collate)

    # model: HfDeepSpeedConfig (kept alive) makes transformers build it under deepspeed.zero.Init
    ds_config = deepspeed_config(run, plan)
    zero3_marker = HfDeepSpeedConfig(ds_config) if plan.zero_stage == 3 else None  # noqa: F841
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float32
    fused_loss = kernels.fuses_loss(plan.fused_kernels, task)
    if plan.fused_kernels:
        kernels.patch_model_classes(read_model_config(run.model)["model_type"])
    model = build_model(run.model, data.labels, dtype, plan.strategy, plan.gradient_checkpointing,
                        device=device if plan.zero_stage == 0 else None)
    if fused_loss:
        kernels.attach_fused_loss(model)
    if plan.strategy in ADAPTER_STRATEGIES:
        model = apply_adapter(model, plan.strategy, run.peft, task, run.model.freeze_depth)
    optimizer = make_optimizer(model, run, device, paged=plan.strategy == "qlora")
    scheduler = make_scheduler(optimizer, run)
    if plan.zero_stage == 3:
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds_config)
    else:  # one worker training adapters: nothing to partition
        engine = PlainEngine(model, optimizer, scheduler, plan.grad_accum, run.optim.grad_clip,
                             torch.bfloat16 if plan.precision == "bf16" else None, device)
    # after a worker failure: the newest complete checkpoint of this run; else resume= (driver-resolved)
    checkpoint = restart_checkpoint(run)
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(run.resume) as directory:
        saved = restore(engine, directory)
    start_step = saved.get("step", 0)
    history: Dict[str, Any] = saved.get("history") or {"train/loss_history": []}
    for key in ("train/lr_history", "train/step_s_history", "train/tokens_history"):
        history.setdefault(key, [])
    progress = Progress(os.path.join(run.run_dir, "progress.json"), enabled=rank == 0)
    if checkpoint is not None:  # a restart inside this run: the steps since that checkpoint run again
        history["train/restarts"] = history.get("train/restarts", 0) + 1
        history["train/repeated_steps"] = history.get("train/repeated_steps", 0) + progress.last_step() - start_step

    tracker = Tracker(run.logger, rank == 0, run.name, run.run_dir, run.trainer.max_steps, config_dict(run),
                      bar=config.get("progress_bar", True))
    if start_step:
        tracker.note(f"resumed at step {start_step}" + (f" after {history['train/restarts']} restart(s), "
                     f"{history['train/repeated_steps']} step(s) repeated" if checkpoint is not None else ""))
    timer = PhaseTimer()
    if start_step == 0:
        with timer("eval_before"):  # inside "command to first step", so timed apart from later evaluations
            history.update(prefixed("eval_before", evaluate_model(engine, data, run, tokenizer, device)))
            history.update(forgetting(engine, data, run, tokenizer, device, "before"))  # kept in checkpoints
        tracker.log(0, history)
    history["time/first_step_at"] = time.time()  # wall clock, for "command to first step"
    metrics: Dict[str, Any] = {}  # stays empty when resuming a run that had already finished

    for step in range(start_step, run.trainer.max_steps):
        inject_fault(config.get("fault"), rank, step + 1)
        started = time.perf_counter()
        timer.start("train")
        batches = [collate([data.train[i] for i in rows], tokenizer.pad_token_id, packed_length)
                   for rows in schedule.micro_batches(step, rank, world_size, plan.micro_batch_size, lengths)]
        # normalise by the whole global batch's weight: the same gradient however it is split
        totals = torch.tensor([sum(target_weight(b["labels"], task, class_weights) for b in batches),
                               sum(b["attention_mask"].sum().item() for b in batches)], dtype=torch.float64,
                              device=device)  # NCCL reduces GPU tensors only
        dist.all_reduce(totals)
        global_weight, global_tokens = totals[0].item(), totals[1].item()
        lr = scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            if fused_loss:  # the model returns the summed loss itself (kernels.attach_fused_loss)
                loss = engine(**model_inputs(batch), labels=labels)
            else:
                loss, _ = loss_terms(engine(**model_inputs(batch)).logits, labels, task, class_weights)
            # DeepSpeed divides by accumulation steps and averages over ranks: undo both
            engine.backward(loss * (world_size * plan.grad_accum / global_weight))
            engine.step()
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum)
        loss_value = loss_sum.item() / global_weight  # waits for the GPU: the step ends here
        step_s = time.perf_counter() - started
        metrics = {"train/loss": loss_value, "train/lr": lr, "train/tokens_per_s": global_tokens / step_s}
        timer.stop("train")
        history["train/loss_history"].append(metrics["train/loss"])
        history["train/lr_history"].append(lr)
        history["train/step_s_history"].append(step_s)  # with tokens_history: throughput after warm-up (bench/)
        history["train/tokens_history"].append(global_tokens)
        done = step + 1
        stop = False
        if run.trainer.eval_every and done % run.trainer.eval_every == 0 and done < run.trainer.max_steps:
            with timer("eval"):
                metrics.update(prefixed("eval", evaluate_model(engine, data, run, tokenizer, device)))
            stop = falls_behind(run, done, metrics, rank, device)
        tracker.log(done, metrics)
        progress.record(done)
        if stop:
            history["train/stopped_early_at"] = done
            tracker.note(f"stopped early at step {done}: eval/{run.trainer.early_stopping_metric} is worse than "
                         "the median of the other trials'")
            break
        if run.trainer.checkpoint_every and done % run.trainer.checkpoint_every == 0 and done < run.trainer.max_steps:
            save_and_report(engine, done, {"step": done, **metrics}, {"history": history})

    with timer("eval"):
        final_eval = prefixed("eval", evaluate_model(engine, data, run, tokenizer, device,
                                                     with_confusion=task is Task.classification))
        final_eval.update(forgetting(engine, data, run, tokenizer, device, "after"))
        final_eval.update(generated_answers(engine, data, run, tokenizer, device, tracker, world_size))
    final = {"step": len(history["train/loss_history"]), **history, **metrics, **final_eval, **timer.seconds(),
             **peak_gpu_memory(device)}
    tracker.finish({k: v for k, v in final.items() if not isinstance(v, list)})
    if run.trainer.save_final:
        save_and_report(engine, final["step"], final, {"history": history},
                        export=(model, tokenizer, plan.strategy, run.peft))
    else:
        report_metrics_only(final, rank)


def quiet_ray_report_lines() -> None:
    """Ray Train (v2) logs every report with its whole metrics dict (our histories: screens of numbers) through
    a logger named by its file's path, outside "ray.train"; the run's summary and metrics.json say it better."""
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # another Ray version: its lines stay
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


class PhaseTimer:
    """Seconds spent per phase (train steps, evaluation), reported as time/<phase>_s."""

    def __init__(self):
        self.total: Dict[str, float] = {}
        self.open: Dict[str, float] = {}

    def start(self, phase: str) -> None:
        self.open[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        self.total[phase] = self.total.get(phase, 0.0) + time.perf_counter() - self.open.pop(phase)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.start(phase)
        yield
        self.stop(phase)

    def seconds(self) -> Dict[str, float]:
        return {f"time/{phase}_s": value for phase, value in self.total.items()}


def peak_gpu_memory(device: torch.device) -> Dict[str, float]:
    """Peak allocated and reserved GPU memory over the run, the largest of any rank (GiB)."""
    if device.type != "cuda":
        return {}
    peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                         dtype=torch.float64, device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return {"gpu/max_allocated_gib": peaks[0].item() / 2**30, "gpu/max_reserved_gib": peaks[1].item() / 2**30}


def make_optimizer(model: torch.nn.Module, run: RunConfig, device: torch.device,
                   paged: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: fused on GPU; paged (bitsandbytes) for QLoRA, whose optimizer
    state pages out to host memory under pressure instead of failing."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=run.optim.lr, betas=tuple(run.optim.betas), eps=run.optim.eps,
                  weight_decay=run.optim.weight_decay)
    if paged:
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW(trainable, **kwargs)
    return torch.optim.AdamW(trainable, fused=device.type == "cuda", **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, run: RunConfig):
    """Linear warmup from 0, then cosine/linear decay (or constant) over trainer.max_steps."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[run.optim.schedule.value]
    return get_scheduler(name, optimizer, num_warmup_steps=int(run.optim.warmup_ratio * run.trainer.max_steps),
                         num_training_steps=run.trainer.max_steps)


def evaluate_model(engine, data, run: RunConfig, tokenizer, device, with_confusion: bool = False) -> Dict[str, Any]:
    """Validation metrics; for a data.mix of several datasets also each one's, as <name>/loss etc."""
    metrics = evaluate(engine, data.validation, run.model.task, run.trainer.micro_batch_size,
                       tokenizer.pad_token_id, device, with_confusion=with_confusion)
    if len(data.parts) > 1:
        for part in data.parts:
            metrics.update(prefixed(part.name, evaluate(engine, part.validation, run.model.task,
                                                        run.trainer.micro_batch_size, tokenizer.pad_token_id, device)))
    return metrics


def forgetting(engine, data, run: RunConfig, tokenizer, device, when: str) -> Dict[str, float]:
    """data.reference_path: loss and perplexity on general text, "before" or "after" fine-tuning (a rise
    after means the model forgot some of its general language modelling)."""
    if not data.reference:
        return {}
    metrics = evaluate(engine, data.reference, run.model.task, run.trainer.micro_batch_size,
                       tokenizer.pad_token_id, device)
    return {f"forgetting/loss_{when}": metrics["loss"], f"forgetting/perplexity_{when}": metrics["perplexity"]}


def generated_answers(engine, data, run: RunConfig, tokenizer, device, tracker, world_size: int) -> Dict[str, float]:
    """Causal LM: ROUGE-L and BLEU of greedy answers to the first validation rows; a few samples on the console.
    Every rank takes part (ZeRO-3 gathers parameters for each generated token)."""
    rows = run.trainer.eval_generate_rows
    if run.model.task is not Task.causal_lm or not rows:
        return {}
    metrics, samples = generation_report(engine.module, data.validation, tokenizer, device, rows,
                                         run.trainer.eval_max_new_tokens, synced_gpus=world_size > 1)
    if samples:
        tracker.note(samples)
    return prefixed("eval", metrics)


def falls_behind(run: RunConfig, step: int, metrics: Dict[str, Any], rank: int, device) -> bool:
    """Sweeps with trainer.early_stopping: the median stopping rule (orchestrator/early_stopping.py), decided
    on rank 0 and broadcast, so that all ranks leave the loop at the same step."""
    if not run.trainer.early_stopping:
        return False
    decision = torch.zeros(1, device=device)
    if rank == 0:
        value = metrics.get(f"eval/{run.trainer.early_stopping_metric}")
        decision[0] = float(early_stopping.decide(run.run_dir, step, value, run.trainer.early_stopping_mode))
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def restart_checkpoint(run: RunConfig) -> Optional[ray.train.Checkpoint]:
    """After a worker failure Ray hands back the last checkpoint it registered; one that every rank had
    finished writing may be newer (registration lags the reports), so take the newer of the two."""
    registered = ray.train.get_checkpoint()
    if registered is None or metrics_only(registered.path):
        return None  # nothing saved, or only a finished run's metrics (trainer.save_final=false)
    on_disk = newest_complete_checkpoint([os.path.join(storage_root(run), run.name)])
    registered_info = checkpoint_info(registered.path) if os.path.isdir(registered.path) else None
    if on_disk is not None and (registered_info is None or on_disk.step > registered_info.step):
        return ray.train.Checkpoint(on_disk.path)
    return registered


class Progress:
    """The last finished step, in a file beside the run: after a restart it tells how many steps repeat."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def last_step(self) -> int:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return int(json.load(handle)["step"])
        except (OSError, ValueError, KeyError):
            return 0

    def record(self, step: int) -> None:
        if self.enabled:
            write_json_atomically(self.path, {"step": step, "time": time.time()})


def inject_fault(fault: Optional[Dict[str, Any]], rank: int, step: int) -> None:
    """Failure drill (ORCHESTRATOR_KILL_WORKER=rank:step on the driver): that worker process kills itself
    with SIGKILL as it starts that step, once per run, to exercise Ray Train's restart and our resume."""
    if not fault or rank != fault["rank"] or step != fault["step"] or os.path.exists(fault["marker"]):
        return
    open(fault["marker"], "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


def prefixed(prefix: str, metrics: Dict[str, float]) -> Dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}
