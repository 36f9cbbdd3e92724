"""`python -m orchestrator [+experiment=NAME] [key=value ...]`: compose, validate, plan, launch.
(`orchestrator train run.yaml`, init, export, chat, predict: orchestrator/cli.py.)

Mistakes a user can make (config, data, model path, resources) end the run before anything starts,
with one line on stderr that names the key or file, and exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import TYPE_CHECKING, List, Sequence

import hydra
import psutil
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from orchestrator import console
from orchestrator.cli import route
from orchestrator.config import Launcher, RunConfig, config_dict, register_schema, to_run_config
from orchestrator.errors import UserError, report_user_error
from orchestrator.model_card import write_model_card
from orchestrator.package_files import hydra_config_path
from orchestrator.plots import save_run_plots
from orchestrator.preflight import (
    DataCheck,
    preflight,
    resume_from,  # noqa: F401 - moved to preflight; importable from here as before
)
from orchestrator.runfile import locate

if TYPE_CHECKING:
    from orchestrator.plan import ClusterResources

register_schema()


@hydra.main(version_base="1.3", config_path=hydra_config_path(), config_name="config")
def main(cfg: DictConfig) -> None:
    run = None
    try:
        run = to_run_config(cfg)
        run.run_dir = HydraConfig.get().runtime.output_dir
        execute(run, overrides=list(HydraConfig.get().overrides.task))
    except UserError as err:  # exit here: past this point Hydra prints its own line about the job
        sys.exit(report_user_error(locate(str(err))))
    except KeyboardInterrupt:  # Ctrl-C: what was kept and how to resume, exit code 130
        from launch.local import report_interrupt

        sys.exit(report_interrupt(run, list(HydraConfig.get().overrides.task)))


def execute(run: RunConfig, overrides: Sequence[str] = ()) -> dict:
    """Everything after composition: checks that need files, the plan, and the launch.
    overrides: the command line's (launcher=rayjob hands them to the job it renders)."""
    if run.launcher is Launcher.rayjob:  # planned here from cluster.*, run by a KubeRay RayJob (k8s/README.md)
        from launch.rayjob import launch_rayjob

        return launch_rayjob(run, overrides)

    from launch.local import run_training

    # every step of the preflight: the run starts here; a dry run may plan a well-known model from its shape
    checked = preflight(run, lambda: local_resources(run), runs_here=True, data=DataCheck.read, check_freeze=True,
                        report=True, shape_only=run.dry_run)
    plan = checked.plan
    if run.dry_run:
        return {}
    result = run_training(run, plan)
    metrics = {**result.metrics, "time/command_started_at": psutil.Process().create_time(),
               "time/finished_at": time.time()}
    with open(os.path.join(run.run_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=1)
    console.final_summary(metrics, run)
    # after the export: a failure here is a warning, never the trained model's loss
    if run.trainer.save_final:
        with console.optional_step("the model card"):
            write_model_card(os.path.join(run.run_dir, "export"), config_dict(run), metrics, strategy=plan.strategy)
    with console.optional_step("the plots"):
        for path in save_run_plots(metrics, checked.raw_data.labels, run.run_dir):
            console.note(f"plot: {path}")
    return metrics


def local_resources(run: RunConfig) -> ClusterResources:
    """What a local run is planned for: what Ray reports, once started (embedded, or joined at cluster.address).
    A dry run starts no Ray: it reads this machine as the embedded Ray would, or plans for cluster.* as given; only
    a dry run for the cluster at cluster.address without cluster.gpus joins it to ask. Nor does a run that this
    machine gives one worker, where nothing else needs Ray: its recipe runs in this process (plan.choose_launch)."""
    from launch.local import detect_resources, set_process_env, start_ray
    from orchestrator.config import in_process_mode
    from orchestrator.plan import ray_needed_for, worker_count
    from orchestrator.preflight import fault_drill_set

    ask_ray = not run.dry_run or (run.cluster.address is not None and run.cluster.gpus is None)
    if ask_ray and in_process_mode(run.cluster) != "false" and not ray_needed_for(run, fault_drill_set(run)):
        set_process_env()  # before CUDA starts in this process: its allocator reads PYTORCH_CUDA_ALLOC_CONF once
        here = detect_resources(run.cluster, ray_started=False)
        if worker_count(run, here) == 1:
            return here
    if ask_ray:
        start_ray(run.cluster)
    return detect_resources(run.cluster, ray_started=ask_ray)


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
        boolean = re.match(r"Value '(.*?)' is not a valid bool", message)
        if boolean:
            return f"{key}={boolean.group(1)} is not allowed: expected true or false"
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
    try:  # subcommands (init, export, chat, predict) run and exit there; a run file becomes overrides (cli.py)
        sys.argv[1:] = route(sys.argv[1:])
    except UserError as err:
        sys.exit(report_user_error(str(err)))
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):  # ours (orchestrator/cli_help.py); Hydra's: --hydra-help
        from orchestrator.cli_help import help_text

        sys.stdout.write(help_text())
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(report_user_error(locate(describe_config_error(err))))
    except UserError as err:  # raised outside main(): a sweep's launcher (e.g. every trial invalid)
        sys.exit(report_user_error(locate(str(err))))


if __name__ == "__main__":
    cli()
