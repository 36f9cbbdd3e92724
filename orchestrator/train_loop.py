"""The per-worker recipe. Ray Train runs one copy per worker (`train_loop`); DeepSpeed does the rest.

Read `Recipe.run` first: the phases in order, each a method below it.

    setup_worker   logging, the process group Ray set up, the seed
    build_data     tokenizer, encoded rows, class weights, the global batch schedule
    build_engine   the model (partitioned by ZeRO-3 as it is built), adapters, optimizer, schedule, engine
    restore        a checkpoint (resume=, or the newest one after a worker failure) into engine and TrainState
    train          evaluate, then train_step after train_step (evaluating, selecting and checkpointing every k)
    finish         the final evaluation (of the selected weights), then checkpoint + consolidated export
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator import early_stopping, kernels
from orchestrator.adapters import apply_adapter
from orchestrator.checkpoint import report_metrics_only, restore, save_and_report
from orchestrator.checkpoint_writer import CheckpointWriter
from orchestrator.config import Precision, RunConfig, Task, config_dict
from orchestrator.data import encode_data, read_data
from orchestrator.data.batching import GlobalBatchSchedule, collate, mix_row_weights, model_inputs
from orchestrator.deepspeed_config import deepspeed_config
from orchestrator.errors import UserError
from orchestrator.generation_eval import generated_answers
from orchestrator.in_process_storage import InProcessStorage
from orchestrator.logs import redirect_worker_output
from orchestrator.losses import class_weights_for, loss_terms, target_weight
from orchestrator.metrics import forgetting_metrics, prefixed, validation_metrics
from orchestrator.model import build_model, load_tokenizer, read_model_config
from orchestrator.optimization import make_optimizer, make_scheduler, schedule_of
from orchestrator.placement import NODES_KEY, gather_nodes
from orchestrator.plain_engine import PlainEngine
from orchestrator.plan import Plan
from orchestrator.progress import ProgressSender, forward_own_warnings
from orchestrator.restarts import FaultDrill, Progress, restart_checkpoint
from orchestrator.run_identity import run_storage
from orchestrator.selection import Selection, WeightSnapshot
from orchestrator.timing import PhaseTimer, peak_gpu_memory
from orchestrator.tracking import Tracker
from orchestrator.train_state import StepMetrics, TrainState


@dataclass
class WorkerInput:
    """What the driver hands every worker: the validated config, the plan, and how to show progress."""

    run: RunConfig
    plan: Plan
    feed: Any = None  # the driver's ProgressFeed (orchestrator/progress.py): rank 0's progress, notes and warnings
    fault: Optional[FaultDrill] = None  # ORCHESTRATOR_KILL_WORKER, for failure drills
    run_id: Optional[str] = None  # run_identity.claim_run: a restart continues only this run's checkpoints
    # the recipe runs in the driver's own process (cluster.in_process: launch/in_process.py), through Ray Train's
    # local mode: no GPU assigned by Ray, and no checkpoint stored by it (in_process_storage.py stores them)
    in_process: bool = False


def train_loop(config: Dict[str, Any]) -> None:
    """Ray Train's entry point on every worker. TorchTrainer's train_loop_config is {"worker": WorkerInput}, or a
    reference to it in Ray's object store: the Train controller then unpickles no config of ours, and imports none
    of torch, DeepSpeed and transformers for it (1.9-3.5 s of a core on the CPU demo, bench/RESULTS.md)."""
    worker = config["worker"]
    Recipe(ray.get(worker) if isinstance(worker, ray.ObjectRef) else worker).run()


class Recipe:
    def __init__(self, worker: WorkerInput):
        self.run_config, self.plan, self.worker = worker.run, worker.plan, worker
        self.task = self.run_config.model.task
        self.total_steps = self.plan.max_steps  # from trainer.epochs or trainer.max_steps (plan.py)
        self.timer = PhaseTimer()
        self.started_at = time.time()  # wall clock: the driver's fit() to here is Ray starting the workers
        self.storage = (InProcessStorage.of(run_storage(self.run_config, worker.run_id),
                                            self.run_config.trainer.keep_checkpoints) if worker.in_process else None)

    def run(self) -> None:
        try:
            # the start-up phases are timed (time/<phase>_s): the console's final summary says where the start went
            for phase in (self.setup_worker, self.build_data, self.build_engine, self.restore):
                with self.timer(phase.__name__):
                    phase()
            try:
                self.train()
                self.finish()
            except BaseException:
                self.checkpoints.close(failing=True)  # the one in flight completes: the restart's, or resume=auto's
                raise
            self.checkpoints.close()
        finally:
            self.release_engine()

    def release_engine(self) -> None:
        """DeepSpeed's engine.destroy(): it removes the hooks ZeRO-3 put on the parameters' gradient nodes, which
        hold the optimizer from outside Python's garbage collector, so that the model, its optimizer state and the
        engine can be freed when the recipe ends. A worker's process ends anyway; a run in the driver's process
        (cluster.in_process), its restarts and the next run there need the memory back."""
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        self.engine = self.model = None

    # --- setup ------------------------------------------------------------------------------------------------

    def setup_worker(self) -> None:
        """Quiet the libraries, join the process group Ray set up, seed."""
        redirect_worker_output(self.run_config.run_dir, ray.train.get_context().get_world_rank())  # logs.py
        if not self.plan.use_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"  # say it, rather than have DeepSpeed warn that it guessed
        import deepspeed
        import transformers

        deepspeed.utils.logger.setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines; our progress says enough
        quiet_ray_report_lines()
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
        transformers.logging.set_verbosity_error()
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.resized = None  # trainer.elastic: Ray Train started fewer (or more) workers than the plan's
        if self.world_size != self.plan.num_workers:  # the same global batch: more or less accumulation
            planned, self.plan = self.plan, self.plan.for_workers(self.world_size)
            self.resized = {"workers/planned": planned.num_workers, "workers/ran": self.world_size,
                            "workers/grad_accum": self.plan.grad_accum}
        self.sender = ProgressSender(self.worker.feed if self.rank == 0 else None)
        if self.rank == 0:
            forward_own_warnings(self.sender)  # ours reach the driver's console; the libraries' stay in the log
        self.device = worker_device(self.worker.in_process, self.plan.use_gpu)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # gpu/max_*_gib are this run's peaks, also where the process ran something before (cluster.in_process:
            # a restart, or the next run of a notebook or a test session)
            torch.cuda.reset_peak_memory_stats(self.device)
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopt the process group Ray set up
        self.nodes = gather_nodes(self.rank, self.world_size)  # which node each rank runs on (placement.py)
        # writes checkpoint_every's checkpoints in the background (trainer.async_checkpoint), times every one
        self.checkpoints = CheckpointWriter(self.run_config.trainer.async_checkpoint, context.get_local_world_size())
        torch.manual_seed(self.run_config.trainer.seed)

    def build_data(self) -> None:
        """Every rank reads and encodes the same rows; the schedule decides who trains on which."""
        run = self.run_config
        self.tokenizer = load_tokenizer(run.model)
        if self.task is Task.classification:  # the export's tokenizer then truncates as training did (predict.py)
            self.tokenizer.model_max_length = run.data.max_length
        self.data = data = encode_data(read_data(run.data, self.task, run.trainer.seed), self.tokenizer,
                                       run.data.max_length)
        self.class_weights = None
        class_of_row = None
        if self.task is Task.classification:
            class_of_row = [e.target for e in data.train]
            counts = torch.bincount(torch.tensor(class_of_row), minlength=len(data.labels))
            self.class_weights = class_weights_for(counts, run.optim.class_weighting.value)
        sample_classes = class_of_row if run.optim.balanced_sampling else None
        row_weights = (mix_row_weights(data.train_source, [p.weight for p in data.parts], sample_classes)
                       if data.parts else None)  # data.mix: each dataset's share of every batch follows its weight
        self.schedule = GlobalBatchSchedule(len(data.train), self.plan.global_batch_size, run.trainer.seed,
                                            sample_classes, row_weights)
        self.lengths = [len(e.input_ids) for e in data.train]
        self.packed_length = run.data.max_length if run.data.packing else None  # one shape per step (collate)

    def build_engine(self) -> None:
        """HfDeepSpeedConfig (kept alive on self) makes transformers build the model under deepspeed.zero.Init,
        so each rank only ever holds its shard; one worker training adapters gets a PlainEngine instead."""
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        run, plan, device = self.run_config, self.plan, self.device
        ds_config = deepspeed_config(run, plan)
        self.zero3_marker = HfDeepSpeedConfig(ds_config) if plan.zero_stage == 3 else None
        dtype = plan.precision.torch_dtype
        self.fused_loss = kernels.fuses_loss(plan.fused_kernels, self.task)
        if plan.fused_kernels:
            kernels.patch_model_classes(read_model_config(run.model)["model_type"])
        model = build_model(run.model, self.data.labels, dtype, plan.strategy, plan.gradient_checkpointing,
                            device=device if plan.zero_stage == 0 else None)
        if self.fused_loss:
            kernels.attach_fused_loss(model)
        if plan.strategy.uses_adapters:
            model = apply_adapter(model, plan.strategy, run.peft, self.task, run.model.freeze_depth)
        self.model = model
        optimizer = make_optimizer(model, run, device, paged=plan.strategy.quantized)
        self.scheduler = make_scheduler(optimizer, run, self.total_steps)
        if plan.zero_stage == 3:
            self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     lr_scheduler=self.scheduler, config=ds_config)
        else:  # one worker training adapters: nothing to partition
            self.engine = PlainEngine(model, optimizer, self.scheduler, plan.grad_accum, run.optim.grad_clip,
                                      dtype if plan.precision is Precision.bf16 else None, device)

    def restore(self) -> None:
        """After a worker failure: the newest complete checkpoint of this run; else resume= (driver-resolved)."""
        run = self.run_config
        checkpoint = restart_checkpoint(run, self.worker.run_id)
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(run.resume) as directory:
            saved = restore(self.engine, directory)
        self.state = TrainState.from_history(saved.get("step", 0), saved.get("history") or {})
        self.progress = Progress(os.path.join(run.run_dir, "progress.json"), enabled=self.rank == 0)
        # a restart inside this run (the driver removed any older progress file: run_identity.claim_run): the steps
        # since that checkpoint, or since the start, run again
        if checkpoint is not None or self.progress.last_step():
            self.state.count_restart(self.progress.last_step())
        self.tracker = Tracker(run.logger, self.rank == 0, run.name, run.run_dir, self.total_steps,
                               config_dict(run), self.sender, self.plan.steps_per_epoch,
                               self.plan.global_batch_size if self.task is Task.classification else 0)
        if self.state.step:
            self.tracker.note(f"resumed at step {self.state.step}" + (
                f" after {self.state.restarts} restart(s), {self.state.repeated_steps} step(s) repeated"
                if checkpoint is not None else ""))
        if self.resized or "workers/ran" in self.state.notes:  # this start's: a later restart may place them all
            self.state.notes.update(self.resized or {"workers/ran": self.world_size,
                                                     "workers/grad_accum": self.plan.grad_accum})
        if self.resized:
            self.tracker.note(f"elastic: running on {self.world_size} of the plan's {self.resized['workers/planned']} "
                              f"workers, {self.plan.grad_accum} accumulation step(s) keep the global batch of "
                              f"{self.plan.global_batch_size} rows")
        resharded = saved.get("resharded")  # written by another number of workers (checkpoint.load_resharded)
        if resharded:
            self.state.notes["resume/reshard_s"] = resharded["seconds"]
            self.tracker.note(f"resumed on {resharded['to']} worker(s) from a checkpoint of {resharded['from']}: its "
                              f"ZeRO-3 shards re-partitioned through DeepSpeed's universal format in "
                              f"{resharded['seconds']:.1f} s (weights, Adam moments and schedule kept); "
                              f"{self.plan.grad_accum} accumulation step(s) keep the global batch of "
                              f"{self.plan.global_batch_size} rows")
        self.selection = Selection.from_notes(self.state.notes, self.plan.select_metric)
        self.snapshot = WeightSnapshot(self.engine)
        if self.selection.best_step is not None and self.selection.best_step < self.state.step:
            # the best weights lived in host memory and did not survive into this process: choose anew
            self.tracker.note(f"selection: the weights of step {self.selection.best_step} are not in the checkpoint; "
                              f"choosing again among the evaluations from step {self.state.step} on")
            self.selection = Selection(self.selection.metric)
        elif self.selection.best_step is not None and run.trainer.select_best:
            self.snapshot.take()  # the checkpoint was written at the best evaluation: these are its weights

    # --- training -----------------------------------------------------------------------------------------------

    def train(self) -> None:
        trainer, state, plan = self.run_config.trainer, self.state, self.plan
        # transformers' from_pretrained returns the model in eval mode: without this, the model's dropout (and
        # peft.dropout) would be off while training; evaluations switch to eval and back (metrics.evaluate)
        self.engine.train()
        if state.step == 0:
            with self.timer("eval_before"):  # inside "command to first step", so timed apart from later evaluations
                state.notes.update(prefixed("eval_before", self.validate()))
                state.notes.update(self.forgetting("before"))  # kept in checkpoints
            self.tracker.log(0, state.to_history())
        self.tracker.start(state.step)
        state.notes["time/first_step_at"] = time.time()  # wall clock, for "command to first step"
        self.last_metrics: Dict[str, Any] = {}  # stays empty when resuming a run that had already finished
        nonfinite = NonFiniteSteps(trainer.max_nonfinite_steps, trainer.checkpoint_every,
                                   saved_step=state.step or None, grad_clip=self.run_config.optim.grad_clip)

        for step in range(state.step, self.total_steps):
            if self.worker.fault:
                if self.worker.fault.step == step + 1:  # every rank: the drill's kill follows complete checkpoints,
                    self.checkpoints.wait()  # as a synchronous save leaves them, so the restart's is known
                self.worker.fault.strike(self.rank, step + 1)
            with self.timer("train"):
                measured = self.train_step(step)
            state.record(measured)
            metrics = self.last_metrics = measured.as_metrics()
            done = state.step
            # the loss is all-reduced: every rank sees the same value and takes the same branch
            if nonfinite.observe(done, measured):
                self.tracker.log(done, metrics, measured.seconds)
                self.progress.record(done)
                if nonfinite.exhausted():
                    self.tracker.note(nonfinite.message())
                    raise UserError(nonfinite.message())
                continue  # broken weights: no evaluation, selection or checkpoint
            stop = ""
            if plan.eval_every and done % plan.eval_every == 0 and done < self.total_steps:
                with self.timer("eval"):
                    metrics.update(prefixed("eval", self.validate()))
                stop = self.select(done, metrics) or self.falls_behind(done, metrics)
            self.tracker.log(done, metrics, measured.seconds)
            self.progress.record(done)
            if stop:
                state.notes["train/stopped_early_at"] = done
                self.tracker.note(f"stopped early at step {done}: {stop}")
                break
            if trainer.checkpoint_every and done % trainer.checkpoint_every == 0 and done < self.total_steps:
                with self.timer("checkpoint"):  # the training loop's wait (time/checkpoint_s)
                    self.save_checkpoint(metrics)
                nonfinite.saved_step = done
        if nonfinite.streak:  # the last steps were not finite, fewer than the limit: no export of those weights
            self.tracker.note(nonfinite.message())
            raise UserError(nonfinite.message())

    def train_step(self, step: int) -> StepMetrics:
        """One optimizer step over this rank's micro-batches of the global batch."""
        started = time.perf_counter()
        plan, device, task = self.plan, self.device, self.task
        batches = [collate([self.data.train[i] for i in rows], self.tokenizer.pad_token_id, self.packed_length)
                   for rows in self.schedule.micro_batches(step, self.rank, self.world_size, plan.micro_batch_size,
                                                           self.lengths)]
        # normalise by the whole global batch's weight: the same gradient however it is split
        totals = torch.tensor([sum(target_weight(b["labels"], task, self.class_weights) for b in batches),
                               sum(b["attention_mask"].sum().item() for b in batches)], dtype=torch.float64,
                              device=device)  # NCCL reduces GPU tensors only
        dist.all_reduce(totals)
        global_weight, global_tokens = totals[0].item(), totals[1].item()
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            if self.fused_loss:  # the model returns the summed loss itself (kernels.attach_fused_loss)
                loss = self.engine(**model_inputs(batch), labels=kernels.fused_targets(labels))
            else:
                loss, _ = loss_terms(self.engine(**model_inputs(batch)).logits, labels, task, self.class_weights)
            # DeepSpeed divides by accumulation steps and averages over ranks: undo both
            self.engine.backward(loss * (self.world_size * plan.grad_accum / global_weight))
            self.engine.step()
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum)
        loss_value = loss_sum.item() / global_weight  # waits for the GPU: the step ends here
        return StepMetrics(loss=loss_value, lr=lr, tokens=global_tokens, seconds=time.perf_counter() - started)

    # --- evaluation ---------------------------------------------------------------------------------------------

    def validate(self, with_confusion: bool = False) -> Dict[str, Any]:
        return validation_metrics(self.engine, self.data, self.task, self.plan.micro_batch_size,
                                  self.tokenizer.pad_token_id, self.device, with_confusion=with_confusion)

    def forgetting(self, when: str) -> Dict[str, float]:
        return forgetting_metrics(self.engine, self.data, self.task, self.plan.micro_batch_size,
                                  self.tokenizer.pad_token_id, self.device, when)

    def select(self, step: int, metrics: Dict[str, Any]) -> str:
        """Model selection on this evaluation: keep the weights if they are the best so far. Returns why to stop
        (trainer.patience evaluations without improvement), else ""."""
        selection = self.selection
        if selection.observe(step, metrics.get(f"eval/{selection.metric}")) and self.run_config.trainer.select_best:
            self.snapshot.take()
        self.state.notes.update(selection.to_notes())
        patience = self.run_config.trainer.patience
        if patience and selection.evaluations_since_best >= patience:
            return (f"eval/{selection.metric} has not improved on step {selection.best_step}'s "
                    f"{selection.best_value:.4f} for {patience} evaluation(s) (trainer.patience)")
        return ""

    def falls_behind(self, step: int, metrics: Dict[str, Any]) -> str:
        """Sweeps with trainer.early_stopping: the median stopping rule against the sibling trials."""
        trainer = self.run_config.trainer
        if not trainer.early_stopping:
            return ""
        behind = early_stopping.falls_behind(self.run_config.run_dir, step,
                                             metrics.get(f"eval/{trainer.early_stopping_metric}"),
                                             trainer.early_stopping_mode, self.rank, self.device)
        return (f"eval/{trainer.early_stopping_metric} is worse than the median of the other trials'"
                if behind else "")

    def choose_final_weights(self, final_eval: Dict[str, Any]) -> Dict[str, Any]:
        """The last weights compete with the best evaluated ones. Where an earlier evaluation wins (and
        trainer.select_best), its weights are put back and evaluated again, so that the final report and the export
        describe the selected model; the last weights' figures stay as eval_last/*. Returns what to add to the
        final evaluation: those, and select/*."""
        selection, step = self.selection, self.state.step
        last_wins = selection.observe(step, final_eval.get(f"eval/{selection.metric}"), ties_win=True)
        if last_wins or not self.run_config.trainer.select_best or not self.snapshot.put_back():
            return {**selection.to_notes(), "select/exported_step": step}
        chosen = prefixed("eval", self.validate(with_confusion=self.task is Task.classification))
        self.tracker.note(f"selection: exporting the weights of step {selection.best_step} (eval/{selection.metric} "
                          f"{selection.best_value:.4f}; the last step's: "
                          f"{final_eval.get(f'eval/{selection.metric}', float('nan')):.4f})")
        last = {f"eval_last/{key.split('/', 1)[1]}": value for key, value in final_eval.items()
                if not isinstance(value, list)}
        return {**chosen, **last, **selection.to_notes(), "select/exported_step": selection.best_step}

    # --- saving -------------------------------------------------------------------------------------------------

    def save_checkpoint(self, metrics: Dict[str, Any], final: bool = False) -> None:
        """Collective: every rank writes its shard; the final one adds the consolidated Hugging Face export."""
        export = (self.model, self.tokenizer, self.plan.strategy, self.run_config.peft) if final else None
        save_and_report(self.engine, self.state.step, {"step": self.state.step, **metrics},
                        {"history": self.state.to_history()}, export=export, identity=self.identity(),
                        writer=self.checkpoints, storage=self.storage)

    def identity(self) -> Dict[str, Any]:
        """What each rank's marker records beside its files: which run wrote it, and with what strategy and
        learning-rate schedule (the driver checks a resumed run against them: checkpoint.check_resume_matches)."""
        return {"run_id": self.worker.run_id, "strategy": self.plan.strategy.value,
                "schedule": schedule_of(self.run_config, self.total_steps)}

    def finish(self) -> None:
        """The final evaluation chooses the exported weights; the export is written right after it, so that the
        optional evaluations that follow (forgetting check, generated answers) cannot cost the trained model: one
        that fails is a warning on the console, and what they measure reaches the driver afterwards."""
        run = self.run_config
        with self.timer("eval"):
            final_eval = prefixed("eval", self.validate(with_confusion=self.task is Task.classification))
            final_eval.update(self.choose_final_weights(final_eval))
        with self.timer("checkpoint"):
            self.checkpoints.wait()  # the last periodic checkpoint is complete: its figures are in the final report
        final = {"step": len(self.state.loss), **self.state.to_history(), **self.last_metrics, **final_eval,
                 **self.timer.seconds(), **peak_gpu_memory(self.device), **self.checkpoints.figures(),
                 NODES_KEY: self.nodes, "time/worker_started_at": self.started_at}
        if run.trainer.save_final:
            self.save_checkpoint(final, final=True)
        else:
            report_metrics_only(final, self.rank)
        late: Dict[str, Any] = {}
        with self.timer("eval"):
            for name, evaluate in self.optional_evaluations():
                try:
                    late.update(evaluate())
                except Exception as err:  # noqa: BLE001 - optional: the export is written already
                    self.tracker.warn(f"{name} failed after training, the export is kept: "
                                      f"{type(err).__name__}: {err}")
        late.update(self.timer.seconds())
        self.tracker.late_metrics(late)
        self.tracker.finish({k: v for k, v in {**final, **late}.items() if not isinstance(v, list)})

    def optional_evaluations(self):
        """(name, evaluation) after the export: each returns metrics; a failure costs only its own figures. Every
        rank runs them (ZeRO-3 gathers parameters collectively), so each fails the same way on every rank."""
        run = self.run_config
        yield "the forgetting check (data.reference_path)", lambda: self.forgetting("after")
        if self.task is Task.causal_lm:
            yield "the generation check (trainer.eval_generate_rows)", lambda: generated_answers(
                self.engine, self.data.validation, self.tokenizer, self.device, run.trainer.eval_generate_rows,
                run.trainer.eval_max_new_tokens, self.tracker.note, self.world_size)


class NonFiniteSteps:
    """trainer.max_nonfinite_steps: consecutive steps whose global loss is NaN or infinite. In bf16 and fp32 the
    optimizer steps on such a gradient anyway (DeepSpeed skips overflowing steps in fp16 only), so the weights
    are broken from the first of them on: nothing is evaluated or saved after it, and the run stops."""

    def __init__(self, limit: int, checkpoint_every: int, saved_step: Optional[int], grad_clip: float):
        self.limit, self.checkpoint_every, self.grad_clip = limit, checkpoint_every, grad_clip
        self.saved_step = saved_step  # the newest checkpoint of this run: the one that stays
        self.streak, self.first_step, self.first_lr, self.step, self.loss = 0, 0, 0.0, 0, float("nan")

    def observe(self, step: int, measured: StepMetrics) -> bool:
        """Whether this step's loss was not finite."""
        if math.isfinite(measured.loss):
            self.streak = 0
            return False
        if not self.streak:
            self.first_step, self.first_lr = step, measured.lr
        self.streak += 1
        self.step, self.loss = step, measured.loss
        return True

    def exhausted(self) -> bool:
        return self.streak >= self.limit

    def message(self) -> str:
        if self.saved_step is not None:
            kept = f"the checkpoint of step {self.saved_step} is kept"
        else:
            kept = "no checkpoint was saved before it" + ("" if self.checkpoint_every else
                                                          " (trainer.checkpoint_every=0)")
        clip = ("optim.grad_clip=1.0 (it is 0: no clipping)" if not self.grad_clip else
                f"a smaller optim.grad_clip (it is {self.grad_clip:g})")
        return (f"training stopped at step {self.step}: the loss was not finite ({self.loss}) for {self.streak} "
                f"step(s) in a row from step {self.first_step} on (trainer.max_nonfinite_steps={self.limit}), at "
                f"learning rate {self.first_lr:.3g}; the weights are broken, so no export was written and {kept}. "
                f"Try a lower optim.lr, or {clip}")


def worker_device(in_process: bool, use_gpu: bool) -> torch.device:
    """The GPU Ray Train assigned this worker (or the CPU); in the driver's own process, where Ray assigns nothing,
    the first GPU this process sees."""
    if not in_process:
        return ray.train.torch.get_device()
    return torch.device("cuda", 0) if use_gpu else torch.device("cpu")


def quiet_ray_report_lines() -> None:
    """Ray Train (v2) logs every report with its whole metrics dict (our histories: screens of numbers) through
    a logger named by its file's path, outside "ray.train"; the run's summary and metrics.json say it better."""
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # another Ray version: its lines stay
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
