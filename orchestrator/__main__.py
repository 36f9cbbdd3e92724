"""`python -m orchestrator [+experiment=NAME] [key=value ...]`: compose, validate, plan, launch.

Mistakes a user can make (config, data, model path, resources) end the run before anything starts,
with one line on stderr that names the key or file, and exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import List, Sequence

import hydra
import psutil
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from orchestrator import console
from orchestrator.config import (
    Launcher,
    Overlong,
    RunConfig,
    absolute_path,
    config_dict,
    register_schema,
    to_run_config,
)
from orchestrator.errors import EXIT_USER_ERROR, UserError
from orchestrator.model_card import write_model_card
from orchestrator.plots import save_run_plots

register_schema()


@hydra.main(version_base="1.3", config_path="../hydra_conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run = to_run_config(cfg)
        run.run_dir = HydraConfig.get().runtime.output_dir
        execute(run, overrides=list(HydraConfig.get().overrides.task))
    except UserError as err:  # exit here: past this point Hydra prints its own line about the job
        exit_with(str(err))


def execute(run: RunConfig, overrides: Sequence[str] = ()) -> dict:
    """Everything after composition: checks that need files, the plan, and the launch.
    overrides: the command line's (launcher=rayjob hands them to the job it renders)."""
    if run.launcher is Launcher.rayjob:  # planned here from cluster.*, run by a KubeRay RayJob (k8s/README.md)
        from launch.rayjob import launch_rayjob

        return launch_rayjob(run, overrides)

    from launch.local import detect_resources, run_training, start_ray
    from orchestrator.data import read_data
    from orchestrator.model import check_freeze_depth, read_model_config
    from orchestrator.plan import describe, make_plan

    base = os.getcwd()
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

    model_config = read_model_config(run.model, shape_only=run.dry_run)  # fails fast on a missing model
    check_freeze_depth(run.model, model_config)
    raw = read_data(run.data, run.model.task, run.trainer.seed)
    console.data_summary(raw)
    if not run.dry_run:
        check_encoded(run, raw)
    resume_from(run)

    sizing_only = run.dry_run and run.cluster.gpus is not None
    if not sizing_only:
        start_ray(run.cluster)
    resources = detect_resources(run.cluster, ray_started=not sizing_only)
    plan = make_plan(run, resources, model_config)
    print(describe(plan, resources.gpu_memory_gb), flush=True)
    plan.save(run.run_dir)
    # null left the micro-batch to the planner; from here on the run holds its pick (evaluation batches, model card)
    run.trainer.micro_batch_size = plan.micro_batch_size
    if run.dry_run:
        return {}
    result = run_training(run, plan)
    metrics = {**result.metrics, "time/command_started_at": psutil.Process().create_time(),
               "time/finished_at": time.time()}
    with open(os.path.join(run.run_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=1)
    console.final_summary(metrics, run)
    for path in save_run_plots(metrics, raw.labels, run.run_dir):
        console.note(f"plot: {path}")
    if run.trainer.save_final:
        write_model_card(os.path.join(run.run_dir, "export"), config_dict(run), metrics, strategy=plan.strategy)
    return metrics


def check_encoded(run: RunConfig, raw) -> None:
    """Tokenize once on the driver: prints the data report, fills the cache that the workers then read,
    and stops before any worker starts when rows are too long and data.overlong=fail."""
    from orchestrator.data import describe_data, encode_data
    from orchestrator.model import load_tokenizer

    data = encode_data(raw, load_tokenizer(run.model))
    console.note(describe_data(data))
    too_long = data.train_report.truncated + data.validation_report.truncated
    if too_long and run.data.overlong is Overlong.fail:
        raise UserError(f"data.path={run.data.path}: {data.train_report.truncated} train and "
                        f"{data.validation_report.truncated} validation rows are longer than data.max_length="
                        f"{run.data.max_length} tokens; raise data.max_length, or set data.overlong=truncate")


def resume_from(run: RunConfig) -> None:
    """resume=auto / a run directory → the checkpoint directory itself (complete ones only)."""
    from orchestrator.checkpoint import resolve_resume, storage_root

    requested = run.resume
    info = resolve_resume(requested, run.run_dir, storage_root(run))
    run.resume = info.path if info else None
    if info:
        console.note(f"resume: from step {info.step}, {info.path}")
    elif requested:
        console.note(f"resume={requested}: no complete checkpoint of {run.name} yet; starting at step 0")


def describe_config_error(err: BaseException) -> str:
    """Hydra/OmegaConf composition errors → one line naming the key, the value and what is allowed."""
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key, message = cause.full_key, cause.msg.splitlines()[0]
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and message.startswith("Key "):
            return f"{key}: no such key; allowed keys here: {', '.join(allowed_keys(key))}"
        invalid = re.match(r"Invalid value '(.*?)', expected one of \[(.*)\]", message)
        if invalid:
            return f"{key}={invalid.group(1)} is not allowed: expected one of {invalid.group(2)}"
        converted = re.match(r"Value '(.*?)' of type '.*?' could not be converted to (\w+)", message)
        if converted:
            return f"{key}={converted.group(1)} is not allowed: expected {converted.group(2).lower()}"
        return f"{key}: {message}"
    text = " ".join(str(err).split("Config search path")[0].split())
    missing = re.search(r"Could not find '(.+?)/(.+?)'.*?Available options in '.+?':\s*(.*)", text)
    if missing:
        group, choice, options = missing.groups()
        return f"{group}={choice} is not allowed: available options: {', '.join(options.split())}"
    return text


def allowed_keys(full_key: str) -> List[str]:
    """The keys the schema allows next to `full_key` (e.g. every trainer.* key for trainer.max_step)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(RunConfig)
    for part in full_key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) and part in node else None
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def cli() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        exit_with(describe_config_error(err))


def exit_with(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    cli()
