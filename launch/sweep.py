"""The sweep launcher: every trial of `python -m orchestrator -m ...` runs at the same time on one Ray cluster.

Hydra's sweeper (the basic grid, or Optuna's) hands this launcher a batch of override lists. Each trial is
composed and validated like a single run, gets its own run directory (Hydra's sweep subdirectory) and is planned
by orchestrator/plan.py to learn what it needs: its workers' GPUs on a GPU cluster, its workers' CPUs on a CPU
one (Ray Train's controller takes none). A trial starts as soon as that fits beside the trials already running,
with at most `max_concurrent` at once: eight one-GPU LoRA trials share an 8-GPU node, two four-GPU full runs
share it too (`gpus_per_trial` sets how many GPUs a trial is planned for).

A trial is the single-run command, `python -m orchestrator <its overrides>`, in a child process that joins the
sweep's Ray cluster (cluster.address) and starts its own Ray Train TorchTrainer there; its output goes to
<its dir>/trial.log. Child processes, not threads: a trial that crashes or leaks cannot take the others down, and
transformers' lazy imports are not safe from two threads at once. A trial that fails is recorded as failed (with
its error) and the others go on. Each trial's <its dir>/trial.json holds its overrides, status, metric,
tokens/s and wall-clock start and end; after each batch launch/sweep_summary.py writes the summary, the plot and
the best trial's overrides into the sweep directory.

Hydra only instantiates launchers from the `hydra_plugins` package: hydra_plugins/orchestrator_launcher names
this class there, and hydra_conf/hydra/launcher/ray_trials.yaml selects it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from launch.sweep_summary import TRIAL_FILE, override_key, read_records, write_summary

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trial:
    num: int
    overrides: List[str]
    run_dir: str
    cfg: Optional[DictConfig] = None  # the composed job config, without hydra
    hydra_cfg: Optional[DictConfig] = None
    run: Any = None  # RunConfig
    plan: Any = None  # Plan
    record: Dict[str, Any] = dataclasses.field(default_factory=dict)

    gpu_memory_gb: Optional[float] = None  # of each GPU the plan was made for (None: unknown or CPU)
    pinned_data: Dict[str, str] = dataclasses.field(default_factory=dict)  # pinned_data(run): for its command

    @property
    def need(self) -> Dict[str, float]:
        """Ray resources the trial's workers take: a GPU each (or the share of one GPU the sweep gave it,
        cluster.gpu_fraction) on GPU, else a CPU each."""
        if not self.plan.use_gpu:
            return {"CPU": self.plan.num_workers}
        return {"GPU": self.run.cluster.gpu_fraction or self.plan.num_workers}


STRATEGY_KEYS = ("strategy", "strategy_if_auto")  # two trials that differ only here may be one plan
MAX_TRIALS_PER_GPU = 8  # beyond this the trials' processes and kernels contend more than they gain
GPU_SHARE_MEMORY = 0.9  # of a GPU's memory the shared trials' predicted peaks may fill together (the plan's rule)
LOG_FILE = "trial.log"  # the trial's console output, in its directory


def pinned_data(run) -> Dict[str, str]:
    """data.registry and data.hub_cache as the single run's driver pins them (sources.pin_sources), for a trial's
    command line: the trial is a child process without the sweep's run file (`orchestrator train FILE -m`), so a
    dataset named in the datasets.yaml beside that file would otherwise be unknown to it. Only what pinning set."""
    from orchestrator.data.sources import pin_sources

    data = copy.deepcopy(run.data)
    before = (data.registry, data.hub_cache)
    pin_sources(data)  # an unknown name fails here, as the trial's own preflight would: that trial alone
    return {key: str(value) for key, value, old in (("data.registry", data.registry, before[0]),
                                                    ("data.hub_cache", data.hub_cache, before[1]))
            if value and value != old}


def hydra_quote(value: str) -> str:
    """A value as Hydra's override grammar reads it back unchanged: quoted unless it is a plain word or path."""
    if re.fullmatch(r"[\w\-./:@%+~]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def error_in_log(path: str, code: int) -> str:
    """The reason a trial's command failed, from its log: the CLI's `error: ...` line (a UserError), else the
    last exception line of the driver's traceback (lines Ray forwards from workers start with "(")."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in handle]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    for line in reversed(lines):
        if not line.startswith("(") and re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*", line):
            return line
    return f"exit code {code} (see {path})"


def default_metric(task_value: str) -> str:
    return "eval/macro_f1" if task_value == "classification" else "eval/loss"


def default_mode(metric: str) -> str:
    return "min" if "loss" in metric or "perplexity" in metric else "max"


def describe_failure(err: BaseException) -> str:
    """One line for a trial that failed in the sweep itself (composing, planning, starting its command): a
    UserError's message, else the exception's last line. No Ray error reaches here: a trial runs in a child
    process, whose errors come back through its log (error_in_log)."""
    from orchestrator.errors import UserError

    if isinstance(err, UserError):
        return str(err)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text, name = (lines[-1] if lines else ""), type(err).__name__
    if not text:
        return name
    return text if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", text) else f"{name}: {text}"


def to_start(needs: Sequence[Dict[str, int]], free: Dict[str, int], running: int,
             max_concurrent: Optional[int]) -> List[int]:
    """Which pending trials (by index, in order) start now: each one whose resources fit in what is still free,
    first come first served, while fewer than max_concurrent run. A smaller trial may pass a larger one that
    does not fit yet."""
    free, chosen = dict(free), []
    for index, need in enumerate(needs):
        if max_concurrent and running + len(chosen) >= max_concurrent:
            break
        if all(free.get(k, 0) >= n for k, n in need.items()):
            for k, n in need.items():
                free[k] -= n
            chosen.append(index)
    return chosen


class RayTrialLauncher(Launcher):
    def __init__(self, max_concurrent: Optional[int] = None, gpus_per_trial: Optional[int] = None,
                 metric: Optional[str] = None, mode: Optional[str] = None, early_stopping: bool = False,
                 trials_per_gpu: Optional[int] = None) -> None:
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"hydra.launcher.max_concurrent={max_concurrent} is not allowed: an integer >= 1")
        if trials_per_gpu is not None and trials_per_gpu < 1:
            raise ValueError(f"hydra.launcher.trials_per_gpu={trials_per_gpu} is not allowed: an integer >= 1, "
                             "or null to fit as many as the GPU's memory holds")
        self.trials_per_gpu = trials_per_gpu
        if mode not in (None, "min", "max"):
            raise ValueError(f"hydra.launcher.mode={mode} is not allowed: min, max or null")
        self.max_concurrent = max_concurrent
        self.gpus_per_trial = gpus_per_trial
        self.metric = metric
        self.mode = mode
        self.early_stopping = early_stopping
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # ---------------------------------------------------------------- the batch

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = os.path.abspath(str(self.config.hydra.sweep.dir))
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        trials = [self._compose(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        runnable = [t for t in trials if t.run is not None]
        if runnable:
            self._start_ray([t.run for t in runnable], len(runnable))
            for trial in runnable:
                self._plan(trial, sweep_dir)
            self._drop_duplicates([t for t in runnable if t.plan is not None])
            self._share_gpus([t for t in runnable if t.plan is not None])
        if not any(t.plan is not None for t in trials):  # nothing to run: one clear line, not a summary of failures
            from orchestrator.errors import UserError

            first = trials[0].record if trials else {"num": "-", "error": "no trials"}
            raise UserError(f"every trial of the sweep is invalid ({len(trials)} of {len(trials)}; each one's error "
                            f"is in its trial.json under {sweep_dir}); trial {first['num']}: {first['error']}")
        log.info(f"Launching {len(trials)} trials on Ray"
                 + (f", at most {self.max_concurrent} at once" if self.max_concurrent else ""))
        self._run_all([t for t in trials if t.plan is not None])

        records = read_records(sweep_dir)
        metric = next((r["metric"] for r in records if r.get("metric")), "eval/loss")
        mode = self._mode(metric)
        written = write_summary(sweep_dir, records, mode)
        print(f"\nsweep: {len(records)} trials, {sum(r['status'] == 'completed' for r in records)} completed "
              f"(best: {mode} {metric}, starred)\n{written['table']}", flush=True)
        for kind in ("csv", "markdown", "plot", "best", "best_export"):
            if kind in written:
                print(f"{kind}: {written[kind]}", flush=True)
        return [self._job_return(t) for t in trials]

    def _mode(self, metric: str) -> str:
        """hydra.launcher.mode, else the direction Optuna's sweeper optimises, else min for a loss."""
        if self.mode:
            return self.mode
        direction = OmegaConf.select(self.config, "hydra.sweeper.direction", default=None)
        if isinstance(direction, str) and direction.lower() in ("maximize", "minimize"):
            return "max" if direction.lower() == "maximize" else "min"
        return default_mode(metric)

    # ---------------------------------------------------------------- per trial, on the driver's main thread

    def _compose(self, num: int, overrides: List[str]) -> Trial:
        """Hydra's config for this trial (as the basic launcher composes it), its .hydra files, its RunConfig.
        A value the schema or validate() rejects fails this trial alone."""
        from orchestrator.config import to_run_config
        from orchestrator.errors import UserError

        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
            sweep_config.hydra.job.num = num
        HydraConfig.instance().set_config(sweep_config)
        run_dir = os.path.abspath(os.path.join(str(sweep_config.hydra.sweep.dir), str(sweep_config.hydra.sweep.subdir)))
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = run_dir
        HydraConfig.instance().set_config(sweep_config)
        cfg = copy.deepcopy(sweep_config)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        trial = Trial(num, overrides, run_dir, cfg=cfg, hydra_cfg=copy.deepcopy(sweep_config))
        trial.record = {"num": num, "overrides": overrides, "run_dir": run_dir, "status": "pending", "error": None,
                        "metric": self.metric, "value": None, "tokens_per_s": None, "started_at": None,
                        "finished_at": None, "workers": None, "strategy": None}
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if sweep_config.hydra.output_subdir is not None:
            hydra_dir = Path(run_dir) / str(sweep_config.hydra.output_subdir)
            hydra_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, hydra_dir / "config.yaml")
            OmegaConf.save(sweep_config.hydra.overrides.task, hydra_dir / "overrides.yaml")
        try:
            trial.run = to_run_config(cfg)
            trial.pinned_data = pinned_data(trial.run)  # here, on the main thread: it may import datasets
        except (UserError, ValueError) as err:
            self._fail(trial, err)
            return trial
        trial.run.run_dir = run_dir
        trial.record["metric"] = self.metric or default_metric(trial.run.model.task.value)
        if self.gpus_per_trial is not None and trial.run.cluster.gpus is None:
            trial.run.cluster.gpus, trial.run.cluster.nodes = self.gpus_per_trial, 1
        return trial

    def _start_ray(self, runs: List[Any], trial_count: int) -> None:
        """One Ray cluster for the sweep: cluster.address if given, else an embedded one. On a machine without
        GPUs the embedded cluster gets logical CPUs for max_concurrent trials (default: as many as the cores
        hold, and at least two); they then share the real cores, as a run's workers already do."""
        import ray
        import torch

        from launch.local import start_ray

        if ray.is_initialized():
            return
        cluster = runs[0].cluster
        if cluster.address is None and (cluster.gpus == 0 or torch.cuda.device_count() == 0):
            per_trial = max(r.cluster.cpu_workers for r in runs)
            at_once = min(trial_count, self.max_concurrent or max(2, (os.cpu_count() or 1) // per_trial))
            cpus = at_once * per_trial
            # start_ray gives an embedded cluster max(cores, cpu_workers + 1) logical CPUs
            cluster = dataclasses.replace(cluster, cpu_workers=max(cluster.cpu_workers, cpus - 1))
        start_ray(cluster)

    def _plan(self, trial: Trial, sweep_dir: str) -> None:
        """The trial's Plan (what execute() will compute again, to the same result), for packing."""
        from launch.local import detect_resources
        from orchestrator.errors import UserError
        from orchestrator.preflight import DataCheck, preflight

        run = trial.run
        if run.logger.group is None:  # one W&B group per sweep; one W&B run name per trial
            run.logger.group = f"{run.name}-{Path(sweep_dir).name}"
        run.name = f"{run.name}-{trial.num}"
        try:
            planned = preflight(
                run, lambda: detect_resources(run.cluster, ray_started=True),  # the sweep's Ray (_start_ray)
                # only to pack the trials: the trial's own command (a child process) runs the run and its whole
                # preflight, so the checks, their failures and the printed plan are in the trial's own log
                runs_here=False, data=DataCheck.skip, check_freeze=False, report=False,
                shape_only=False,  # as the sweep always planned: from the model's own config.json, dry run or not
            )
        except UserError as err:
            self._fail(trial, err)
            return
        trial.plan = planned.plan
        trial.gpu_memory_gb = planned.resources.gpu_memory_gb
        trial.record.update(workers=trial.plan.num_workers, strategy=trial.plan.strategy)
        self._write(trial)

    def _drop_duplicates(self, trials: List[Trial]) -> None:
        """A trial whose plan is another's is not run twice: `strategy_if_auto=auto,full` (+sweep=auto) is two
        trials where the planner picks LoRA on one GPU, one trial twice where it picks full fine-tuning on many or
        where the user named the strategy. The later one is listed as a duplicate of the first."""
        seen: Dict[tuple, Trial] = {}
        for trial in trials:
            others = tuple(sorted(o for o in trial.overrides if override_key(o) not in STRATEGY_KEYS))
            key = (others, trial.plan.strategy.value, trial.plan.num_workers)
            if key not in seen:
                seen[key] = trial
                continue
            first = seen[key]
            now = time.time()
            trial.record.update(status="duplicate", started_at=now, finished_at=now,
                                error=f"the same plan as trial {first.num} (strategy={trial.plan.strategy.value})")
            trial.plan = None
            self._write(trial)
            log.info(f"trial {trial.num}: {trial.record['error']}, not run twice")

    def _share_gpus(self, trials: List[Trial]) -> None:
        """Small trials share a GPU: where every trial is one worker on a GPU, with a predicted peak that leaves
        room for others (hydra.launcher.trials_per_gpu, or as many as fit in 90% of the GPU's memory, at most 8
        and at most the number of trials), each takes that share of a GPU (cluster.gpu_fraction) and plans for
        that share of its memory. On a one-GPU machine the six trials of +sweep=auto then train at once."""
        if not trials or self.trials_per_gpu == 1:
            return
        plans = [t.plan for t in trials]
        if not all(p.use_gpu and p.num_workers == 1 for p in plans) or any(
                t.run.cluster.gpu_fraction is not None for t in trials):  # set by the user: theirs
            return
        share = self.trials_per_gpu
        if share is None:
            memory = min((t.gpu_memory_gb for t in trials if t.gpu_memory_gb), default=None)
            predicted = max((p.predicted_gib_per_gpu or 0.0) for p in plans)
            if memory is None or not predicted:
                return  # nothing to size a share by
            share = min(len(trials), MAX_TRIALS_PER_GPU, int(GPU_SHARE_MEMORY * memory // predicted))
        if share < 2:
            return
        # Ray keeps resource amounts to 4 decimals: 1/share rounded down to them, so that `share` of them fit in 1
        fraction = math.floor(1e4 / share) / 1e4
        for trial in trials:
            trial.run.cluster.gpu_fraction = fraction
        log.info(f"{share} trials share each GPU (cluster.gpu_fraction={fraction}): each one's plan predicts "
                 f"{max((p.predicted_gib_per_gpu or 0.0) for p in plans):.1f} GiB at most")

    # ---------------------------------------------------------------- running them together

    def _run_all(self, trials: List[Trial]) -> None:
        """Start trials in order whenever their resources are free (a later, smaller trial may go first);
        one thread per running trial; a trial larger than the whole cluster fails without starting."""
        import ray

        capacity = {k: int(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU")}
        for trial in [t for t in trials if any(n > capacity[k] for k, n in t.need.items())]:
            self._fail(trial, RuntimeError(f"needs {self._need_text(trial)}, the cluster has "
                                           f"{capacity['GPU']} GPUs and {capacity['CPU']} CPUs"))
            trials.remove(trial)
        free = dict(capacity)
        pending, running = list(trials), 0
        finished: "queue.Queue[Trial]" = queue.Queue()
        while pending or running:
            starting = to_start([t.need for t in pending], free, running, self.max_concurrent)
            for trial in [pending[i] for i in starting]:
                for k, n in trial.need.items():
                    free[k] -= n
                running += 1
                log.info(f"trial {trial.num} starts ({self._need_text(trial)}): {' '.join(trial.overrides)}")
                threading.Thread(target=self._run_trial, args=(trial, finished), daemon=True,
                                 name=f"trial-{trial.num}").start()
            pending = [t for i, t in enumerate(pending) if i not in starting]
            assert running, "a trial that fits the empty cluster always starts"
            done = finished.get()
            running -= 1
            for k, n in done.need.items():
                free[k] += n
            record = done.record
            log.info(f"trial {done.num} {record['status']} after {record['finished_at'] - record['started_at']:.0f}s"
                     + (f": {record['metric']}={record['value']}" if record["status"] == "completed"
                        else f": {record['error']}"))

    def _run_trial(self, trial: Trial, finished: "queue.Queue[Trial]") -> None:
        """The trial's single run as a child process on the sweep's cluster; its metrics from its metrics.json."""
        trial.record.update(status="running", started_at=time.time())
        self._write(trial)
        try:
            with open(os.path.join(trial.run_dir, LOG_FILE), "w", encoding="utf-8") as log_file:
                code = subprocess.run(self._command(trial), stdout=log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            metrics_path = os.path.join(trial.run_dir, "metrics.json")
            if code == 0:
                metrics = {}
                if os.path.exists(metrics_path):
                    with open(metrics_path, encoding="utf-8") as handle:
                        metrics = json.load(handle)
                stopped = metrics.get("train/stopped_early_at")  # behind the median: not a candidate for best
                trial.record.update(status="stopped" if stopped else "completed",
                                    value=metrics.get(trial.record["metric"]),
                                    tokens_per_s=metrics.get("train/tokens_per_s"))
            else:
                trial.record.update(status="failed", error=error_in_log(os.path.join(trial.run_dir, LOG_FILE), code))
        except Exception as err:  # noqa: BLE001 - a trial's failure is recorded, never the sweep's end
            trial.record.update(status="failed", error=describe_failure(err))
        finally:
            trial.record["finished_at"] = time.time()
            self._write(trial)
            finished.put(trial)

    def _command(self, trial: Trial) -> List[str]:
        """`python -m orchestrator` with the trial's overrides, as one run in the trial's directory, on the
        sweep's Ray cluster, with the W&B group and name and the GPU count the sweep gave it."""
        import ray

        run = trial.run
        own = {"hydra.run.dir": trial.run_dir, "hydra.mode": "RUN",
               "cluster.address": ray.get_runtime_context().gcs_address, "name": run.name,
               "logger.group": run.logger.group}
        if self.gpus_per_trial is not None:
            own.update({"cluster.gpus": str(run.cluster.gpus), "cluster.nodes": str(run.cluster.nodes)})
        if run.cluster.gpu_fraction is not None:  # a share of one GPU (_share_gpus): one worker on it
            own.update({"cluster.gpu_fraction": str(run.cluster.gpu_fraction)})
        own.update(trial.pinned_data)
        if self.early_stopping:  # the median rule, on the metric the sweep ranks by, at every evaluation
            metric = trial.record["metric"]
            own.update({"trainer.early_stopping": "true", "trainer.early_stopping_metric": metric.removeprefix("eval/"),
                        "trainer.early_stopping_mode": self._mode(metric)})
        kept = [o for o in trial.overrides if override_key(o) not in own]
        return [sys.executable, "-m", "orchestrator", *kept, *(f"{k}={hydra_quote(v)}" for k, v in own.items())]

    # ---------------------------------------------------------------- records

    def _fail(self, trial: Trial, err: BaseException) -> None:
        now = time.time()
        trial.record.update(status="failed", error=describe_failure(err), started_at=now, finished_at=now)
        self._write(trial)
        log.warning(f"trial {trial.num} failed: {trial.record['error']}")

    @staticmethod
    def _write(trial: Trial) -> None:
        with open(os.path.join(trial.run_dir, TRIAL_FILE), "w", encoding="utf-8") as handle:
            json.dump(trial.record, handle, indent=1)

    @staticmethod
    def _need_text(trial: Trial) -> str:
        return ", ".join(f"{n} {k}" for k, n in trial.need.items())

    def _job_return(self, trial: Trial) -> JobReturn:
        """Hydra's record of the job. A failed trial is returned as completed with the value None, so that the
        basic sweeper does not stop the sweep over it, and Optuna's records it as a failed trial."""
        ret = JobReturn(overrides=trial.overrides, cfg=trial.cfg, hydra_cfg=trial.hydra_cfg,
                        working_dir=os.getcwd(), task_name=str(trial.hydra_cfg.hydra.job.name),
                        status=JobStatus.COMPLETED)
        value = trial.record.get("value")
        ret.return_value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        return ret
