"""The checks before a run and its plan, in one function for the three places that plan a run:

    preflight(run, resources, ...) -> Preflight(plan, resources, model_config, raw_data)

In order: the user's paths made absolute; the model's config.json read and model.freeze_depth checked; the data
read and summarised; the data tokenized once and resume= resolved; the resources asked for; the plan made (and, for
a run that starts here, where its recipe runs: cluster.in_process), printed and saved to <run_dir>/plan.json; the
planner's micro-batch pick written back into the run. A mistake found on the way is a UserError, raised before
anything starts.

Who calls it, and why the arguments differ (each call names them):
- execute() (`python -m orchestrator`) runs the run in this process: every step.
- launcher=rayjob (launch/rayjob.py) plans for a Kubernetes cluster and renders a RayJob whose pods run
  `python -m orchestrator` with the same overrides, and so this preflight again, for real. Here the run stays as
  composed, and only what this machine has is checked.
- the sweep launcher (launch/sweep.py) plans each trial only to pack the trials onto its Ray cluster; each
  trial's own command runs the whole preflight, in the trial's log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Optional

from rich.markup import escape

from orchestrator import console
from orchestrator.config import Overlong, RunConfig, absolute_path
from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.data import RawData
    from orchestrator.plan import ClusterResources, Plan


class DataCheck(Enum):
    """How the preflight reads the data."""

    read = "read"  # read and summarised here; missing or malformed data is an error
    # read and summarised where data.path and data.validation_path are on this machine (or a bundled sample),
    # else a note: launcher=rayjob's job reads the data in the cluster
    where_present = "where_present"
    skip = "skip"  # not read here


@dataclass
class Preflight:
    plan: Plan
    resources: ClusterResources  # what the plan is for
    model_config: dict  # the model's config.json, config_overrides applied
    raw_data: Optional[RawData]  # None where the data was not read here


def preflight(run: RunConfig, resources: Callable[[], ClusterResources], *, runs_here: bool, data: DataCheck,
              check_freeze: bool, report: bool, shape_only: bool = False,
              model_config: Optional[dict] = None) -> Preflight:
    """The checks that need files, then the plan (see the module's docstring for the order).

    resources: what to plan for; called once the model and the data have passed (execute starts Ray there).
    runs_here: this process goes on to run `run` (execute): the user's paths are made absolute (Ray's workers run
        in another working directory), the data is tokenized once on the driver (not in a dry run: it fills the
        cache the workers read, and stops over-long rows with data.overlong=fail before any worker starts),
        resume= is resolved, and the run holds the planner's micro-batch pick. False where another process runs
        the run and this preflight again: `run` then stays as composed (launcher=rayjob renders the pods'
        command from it).
    data: how the data is read (DataCheck); runs_here needs it read.
    check_freeze: check model.freeze_depth against the model's layers.
    report: print the plan and save <run_dir>/plan.json.
    shape_only: a well-known hub id that is not on this machine is planned from the shape the project carries.
    model_config: the model's config.json as the caller has read it already; else read here.
    """
    from orchestrator.data import origin_note, read_data
    from orchestrator.data.sources import pin_sources
    from orchestrator.model import (
        check_adapter_targets,
        check_freeze_depth,
        check_model_config,
        check_prompt_pooling,
        read_model_config,
    )
    from orchestrator.plan import choose_launch, describe, make_plan

    assert not runs_here or data is DataCheck.read, "a run that starts here reads its data here"
    if runs_here:
        make_paths_absolute(run, os.getcwd())
        pin_sources(run.data)  # dataset names resolved here; the workers get the registry and cache it used
    if model_config is None:
        model_config = read_model_config(run.model, shape_only=shape_only)  # fails fast on a missing model
    if check_freeze:
        check_freeze_depth(run.model, model_config)
    check_model_config(run.model, model_config, run.data.max_length)  # position limit, config_overrides
    raw = None
    if data is DataCheck.read or (data is DataCheck.where_present and data_on_this_machine(run)):
        raw = read_data(run.data, run.model.task, run.trainer.seed)
        if origin_note(raw):  # a dataset by name: where its rows came from
            console.note(escape(origin_note(raw)))
        console.data_summary(raw)
    elif data is DataCheck.where_present:
        console.note(f"data.path={run.data.path} is not on this machine: the job reads it in the cluster")
    train_rows = len(raw.train) if raw is not None else None
    if runs_here:
        if not run.dry_run:
            train_rows = check_encoded(run, raw)  # after packing: the rows an epoch draws
        resume_from(run)
    planned_for = resources()
    plan = make_plan(run, planned_for, model_config)
    if runs_here:
        from orchestrator.checkpoint import keep_resumed_global_batch

        if keep_resumed_global_batch(run, plan):  # on another number of workers: the checkpoint's global batch
            plan = make_plan(run, planned_for, model_config)
    if plan.strategy.uses_adapters:
        check_adapter_targets(run.model, model_config, run.peft.target_modules)
        check_prompt_pooling(run.model, model_config, plan.strategy)
    plan_recipe(run, plan, train_rows, apply=runs_here)
    if runs_here:
        from orchestrator.checkpoint import check_resume_matches

        check_resume_matches(run, plan)  # the checkpoint's workers, strategy, schedule and global batch
        plan.in_process, plan.launch_reason = choose_launch(run, plan, fault_drill=fault_drill_set(run))
    if report:
        print(describe(plan, planned_for.gpu_memory_gb), flush=True)
        plan.save(run.run_dir)
    if runs_here:
        # null left the micro-batch to the planner; from here on the run holds its pick (evaluation batches, model card)
        run.trainer.micro_batch_size = plan.micro_batch_size
    return Preflight(plan=plan, resources=planned_for, model_config=model_config, raw_data=raw)


def fault_drill_set(run: RunConfig) -> bool:
    """ORCHESTRATOR_KILL_WORKER is set: a worker of this run will kill its own process (restarts.FaultDrill)."""
    from orchestrator.restarts import FaultDrill

    return FaultDrill.from_environment(run.run_dir) is not None


def plan_recipe(run: RunConfig, plan: Plan, train_rows: Optional[int], apply: bool) -> None:
    """The strategy's hyperparameters where the user set none, the run's length in steps, when it evaluates and
    what selects the exported weights, into the plan (and, with `apply`, into the run the workers get)."""
    from orchestrator import hyperparameters

    resolved = hyperparameters.resolve(run, plan.strategy)
    epochs = resolved["trainer.epochs"].value if "trainer.epochs" in resolved else None
    length = hyperparameters.training_length(run, epochs, train_rows, plan.global_batch_size)
    plan.max_steps, plan.steps_per_epoch, plan.steps_reason = length.max_steps, length.steps_per_epoch, length.reason
    if train_rows is None:
        plan.steps_reason += " (the training rows are counted where the run starts)"
    every = run.trainer.eval_every
    plan.eval_every = length.steps_per_epoch if every is None else every
    plan.select_metric = hyperparameters.selection_metric(run)
    when = "once per epoch" if every is None else (f"every {every} steps" if every else "after training only")
    exported = (f"the weights of the evaluation with the best eval/{plan.select_metric} (the last one included)"
                if run.trainer.select_best else "the last weights (trainer.select_best=false)")
    plan.selection_reason = f"validation {when} ({plan.eval_every or '-'} steps); exported: {exported}" + (
        f"; stop after {run.trainer.patience} evaluations without improvement" if run.trainer.patience else "")
    plan.hyperparameters = hyperparameters.as_json(resolved)
    if apply:
        hyperparameters.apply(run, resolved)
        run.trainer.max_steps, run.trainer.eval_every = plan.max_steps, plan.eval_every


def make_paths_absolute(run: RunConfig, base: str) -> None:
    """Every user path in the run made absolute against `base` (hub ids and bundled samples stay as they are)."""
    run.model.path = absolute_path(run.model.path, base)
    run.model.tokenizer_path = absolute_path(run.model.tokenizer_path, base)
    run.data.path = absolute_path(run.data.path, base)
    run.data.validation_path = absolute_path(run.data.validation_path, base)
    run.data.reference_path = absolute_path(run.data.reference_path, base)
    for entry in run.data.mix or []:
        entry.path, entry.validation_path = absolute_path(entry.path, base), absolute_path(entry.validation_path, base)
    if run.resume != "auto":
        run.resume = absolute_path(run.resume, base)
    if run.data.cache_dir:
        run.data.cache_dir = os.path.abspath(os.path.expanduser(run.data.cache_dir))


def data_on_this_machine(run: RunConfig) -> bool:
    from orchestrator.data.sources import on_this_machine

    return on_this_machine(run.data)  # a path here, a sample, a registry name, or a hub id in the local cache


def check_encoded(run: RunConfig, raw) -> int:
    """Tokenize once on the driver: prints the data report, fills the cache that the workers then read,
    and stops before any worker starts when rows are too long and data.overlong=fail. Returns the number of
    training rows (examples after packing)."""
    from orchestrator.data import describe_data, encode_data
    from orchestrator.model import load_tokenizer

    data = encode_data(raw, load_tokenizer(run.model))
    console.note(describe_data(data))
    if not data.train or not data.validation:
        raise UserError(f"data.path={run.data.path}: the {'training' if not data.train else 'validation'} set is "
                        "empty after tokenization (see the data report above); check the data or data.max_length")
    too_long = data.train_report.truncated + data.validation_report.truncated
    if too_long and run.data.overlong is Overlong.fail:
        raise UserError(f"data.path={run.data.path}: {data.train_report.truncated} train and "
                        f"{data.validation_report.truncated} validation rows are longer than data.max_length="
                        f"{run.data.max_length} tokens; raise data.max_length, or set data.overlong=truncate")
    return len(data.train)


def resume_from(run: RunConfig) -> None:
    """resume=auto / a run directory → the checkpoint directory itself (complete ones only); a local path, or a URI
    where cluster.storage_path is one (or resume= names one). First cluster.storage_path is checked: a URI that
    pyarrow's filesystem layer cannot open stops here, before Ray starts."""
    from orchestrator.checkpoint import check_storage, resolve_resume
    from orchestrator.run_identity import check_run_dir, run_storage

    check_storage(run)  # a path (made absolute), or a URI pyarrow opens
    check_run_dir(run)  # another run's directory is continued only when resume= asks for it
    requested = run.resume
    info = resolve_resume(requested, run.run_dir, run_storage(run, None))  # this experiment's runs only
    run.resume = info.path if info else None
    if info:
        console.note(f"resume: from step {info.step}, {info.path}")
    elif requested:
        console.note(f"resume={requested}: no complete checkpoint of {run.name} yet; starting at step 0")
