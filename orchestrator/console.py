"""What the driver prints: the data summary before training and the before/after table at the end."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Dict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.config import RunConfig
from orchestrator.placement import NODES_KEY, describe_nodes

_console = Console(highlight=False, soft_wrap=True)


def data_summary(raw) -> None:
    line = f"data: {raw.format.value}, {len(raw.train)} train rows, {len(raw.validation)} validation rows"
    if raw.parts:  # data.mix: each dataset's rows and its share of the training rows
        total = sum(p.weight for p in raw.parts)
        line = f"data: mix of {len(raw.parts)} datasets, {len(raw.train)} train rows, {len(raw.validation)} " \
               "validation rows"
        for p in raw.parts:
            line += (f"\n  {p.name} ({p.format.value}): {len(p.train)} train rows, {len(p.validation)} validation "
                     f"rows, weight {p.weight:g} ({p.weight / total:.0%} of training rows)")
    if raw.reference:
        line += f"\nforgetting check: {len(raw.reference)} reference rows ({raw.config.reference_path})"
    if raw.labels is not None:
        counts = Counter(str(r.fields["label"]) for r in raw.train)
        shares = ", ".join(f"{name} {counts[name] / len(raw.train):.0%}" for name in raw.labels)
        line += f"\ntrain labels: {shares}"
    _console.print(line)


def note(line: str) -> None:
    _console.print(line)


def warning(line: str) -> None:
    """Something failed that the run survives (the user may want to act on it)."""
    _console.print(f"[bold yellow]warning:[/] {escape(line)}")


@contextlib.contextmanager
def optional_step(what: str):
    """A step after the export (plots, the model card): its failure is a warning, and the run goes on."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - optional: the trained model is exported already
        warning(f"{what} failed after training, the export is kept: {type(err).__name__}: {err}")


STARTUP_PHASES = (  # (label, seconds from the metrics); the recipe times its own phases (train_loop.Recipe.run)
    ("imports, Ray and the plan", lambda m: m["time/fit_started_at"] - m["time/command_started_at"]),
    ("Ray Train starting the workers", lambda m: m["time/worker_started_at"] - m["time/fit_started_at"]),
    ("worker setup", lambda m: m["time/setup_worker_s"]),
    ("data", lambda m: m["time/build_data_s"]),
    ("model and engine", lambda m: m["time/build_engine_s"]),
    ("checkpoint restore", lambda m: m["time/restore_s"]),
    ("evaluation before", lambda m: m.get("time/eval_before_s", 0.0)),
)


def startup_account(metrics: Dict) -> str:
    """Where the time from the command to the first step went, phase by phase ('' for runs without the marks)."""
    try:
        parts = [(label, seconds(metrics)) for label, seconds in STARTUP_PHASES]
        if metrics.get("launch/in_process"):  # the recipe ran in this process (cluster.in_process): no Ray started,
            # no workers to start; the moment between fit() and the recipe (Ray Train's local controller) is the plan's
            parts[:2] = [("imports and the plan", parts[0][1] + parts[1][1])]
        total = metrics["time/first_step_at"] - metrics["time/command_started_at"]
    except KeyError:
        return ""
    parts.append(("the rest", total - sum(value for _, value in parts)))  # e.g. the tracker's start
    shown = ", ".join(f"{label} {value:.1f}s" for label, value in parts if value >= 0.05)
    return f"start-up {total:.0f}s: {shown}"


def final_summary(metrics: Dict, run: RunConfig) -> None:
    exported = metrics.get("select/exported_step")
    selected = exported is not None and exported != metrics.get("step")
    table = Table(title=f"{run.name}: validation before and after {run.trainer.max_steps} steps"
                        + (f" (exported: step {exported}, the best eval/{metrics.get('select/metric')})"
                           if selected else ""))
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after" + (f" (step {exported})" if selected else ""), justify="right")
    for key in sorted(k.removeprefix("eval/") for k in metrics
                      if k.startswith("eval/") and isinstance(metrics[k], (int, float))):
        before = metrics.get(f"eval_before/{key}")
        table.add_row(key, "-" if before is None else f"{before:.4f}", f"{metrics[f'eval/{key}']:.4f}")
    for key in ("loss", "perplexity"):  # data.reference_path: general text, to see what fine-tuning forgot
        if f"forgetting/{key}_after" in metrics:
            before = metrics.get(f"forgetting/{key}_before")
            table.add_row(f"reference {key} (forgetting)", "-" if before is None else f"{before:.4f}",
                          f"{metrics[f'forgetting/{key}_after']:.4f}")
    _console.print(table)
    started = metrics["time/command_started_at"]
    _console.print(f"time: {metrics['time/finished_at'] - started:.0f}s in all; first step after "
                   f"{metrics['time/first_step_at'] - started:.0f}s; training {metrics.get('time/train_s', 0):.0f}s; "
                   f"evaluation {metrics.get('time/eval_before_s', 0) + metrics.get('time/eval_s', 0):.0f}s")
    startup = startup_account(metrics)
    if startup:
        _console.print(startup)
    if metrics.get(NODES_KEY):  # which node each rank ran on (orchestrator/placement.py)
        _console.print(describe_nodes(metrics[NODES_KEY]))
    _console.print(f"export: {os.path.join(run.run_dir, 'export')}")
