"""A sweep's results, from its trial records: CSV, markdown table, metric-vs-parameter plot, best overrides.

Pure functions of the records (plain dicts, as each trial writes them to <trial dir>/trial.json), so they can be
tested without Ray and rerun on a finished sweep directory. A record holds:
  num, overrides (Hydra's override strings), status ("completed" | "stopped" | "failed" | "duplicate"), error,
  metric (its name), value, tokens_per_s, started_at, finished_at (wall clock, seconds), workers, strategy, run_dir.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

TRIAL_FILE = "trial.json"
FILES = {"csv": "summary.csv", "markdown": "summary.md", "plot": "metric_vs_params.png",
         "best": "best_overrides.txt"}


def override_key(override: str) -> str:
    """'+model.freeze_depth=2' → 'model.freeze_depth' (the key without Hydra's +, ++ or ~ prefix). Also what
    launch/rayjob.py reads the command line's overrides with, for the job's entrypoint."""
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def runnable_overrides(overrides: Sequence[str]) -> List[str]:
    """The trial's own overrides: Hydra's settings (hydra.*) are left out."""
    return [o for o in overrides if not override_key(o).startswith(("hydra.", "hydra/"))]


def swept_keys(records: Sequence[Dict[str, Any]]) -> List[str]:
    """Keys whose value differs between trials, in the order they first appear (with one trial: all of its
    overrides). A key some trials lack counts as differing."""
    keys: List[str] = []
    values: Dict[str, set] = {}
    for record in records:
        mapping = {override_key(o): override_value(o) for o in runnable_overrides(record["overrides"])}
        for key in mapping:
            if key not in keys:
                keys.append(key)
        for key in keys:
            values.setdefault(key, set()).add(mapping.get(key))
    differing = [k for k in keys if len(values[k]) > 1]
    return differing if differing or len(records) != 1 else keys


def swept_values(record: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Optional[str]]:
    mapping = {override_key(o): override_value(o) for o in record["overrides"]}
    return {k: mapping.get(k) for k in keys}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_trial(records: Sequence[Dict[str, Any]], mode: str) -> Optional[Dict[str, Any]]:
    """The completed trial with the best value (mode "max" or "min"); ties go to the lower trial number."""
    scored = [r for r in records if r["status"] == "completed" and is_number(r.get("value"))]
    if not scored:
        return None
    sign = -1 if mode == "max" else 1
    return min(scored, key=lambda r: (sign * r["value"], r["num"]))


def rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per trial (by trial number): swept values, the metric, tokens/s, status, times, error."""
    records = sorted(records, key=lambda r: r["num"])
    keys = swept_keys(records)
    metric = next((r["metric"] for r in records if r.get("metric")), "metric")
    table = []
    for r in records:
        started, finished = r.get("started_at"), r.get("finished_at")
        error = " ".join(str(r.get("error") or "").split())  # one line
        table.append({"trial": r["num"], **swept_values(r, keys), metric: r.get("value"),
                      "tokens_per_s": r.get("tokens_per_s"), "status": r["status"],
                      "seconds": finished - started if is_number(started) and is_number(finished) else None,
                      "started_at": started, "finished_at": finished, "error": error})
    return table


def to_csv(table: Sequence[Dict[str, Any]]) -> str:
    if not table:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0].keys()), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Sequence[Dict[str, Any]], best_num: Optional[int] = None) -> str:
    """The table without the wall-clock columns; the best trial's number is starred, an error cut to 80 chars."""
    if not table:
        return "(no trials)\n"
    columns = [c for c in table[0] if c not in ("started_at", "finished_at")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in table:
        cells = []
        for column in columns:
            value = row[column]
            if column == "trial" and value == best_num:
                cells.append(f"{value} *")
            elif column == "error":
                text = _cell(value) if value else ""
                cells.append(text[:77] + "..." if len(text) > 80 else text)
            elif column == "seconds" and is_number(value):
                cells.append(f"{value:.0f}")
            else:
                cells.append(_cell(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _as_number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def plot(records: Sequence[Dict[str, Any]], path: str, best_num: Optional[int] = None) -> Optional[str]:
    """The figure of sweep_figure as a PNG at path; None if nothing to plot."""
    figure = sweep_figure(records, best_num)
    if figure is None:
        return None
    figure.savefig(path, dpi=100)
    return path


def _log_scaled(key: str, numbers: Sequence[float]) -> bool:
    """Log scale for a positive parameter that is a rate or a scale (optim.lr, optim.lr_scale, ...) or spans more
    than 10x: its values are usually spaced by factors."""
    if min(numbers) <= 0 or len(set(numbers)) < 2:
        return False
    name = key.rsplit(".", 1)[-1]
    return name in ("lr", "learning_rate") or name.startswith("lr_") or name.endswith("_lr") or \
        max(numbers) / min(numbers) > 10


def sweep_figure(records: Sequence[Dict[str, Any]], best_num: Optional[int] = None):
    """One panel per swept parameter: the metric of each completed trial against that parameter's value, ticks
    at the values swept (a log axis for rates and wide ranges); the best trial a red star named in a legend.
    None if nothing to plot. Drawn on matplotlib's Agg canvas without pyplot (no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, NullLocator

    keys = swept_keys(records)
    done = [r for r in records if r["status"] == "completed" and is_number(r.get("value"))]
    if not keys or not done:
        return None
    metric = done[0]["metric"]
    best = next((r for r in done if r["num"] == best_num), None)
    figure = Figure(figsize=(4.5 * len(keys), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for axis, key in zip(axes, keys):
        texts = [swept_values(r, [key])[key] for r in done]
        numbers = [_as_number(t) for t in texts]
        if all(n is not None for n in numbers):
            xs = numbers
            ticks = sorted(set(numbers))
            if _log_scaled(key, numbers):
                axis.set_xscale("log")
                axis.xaxis.set_minor_locator(NullLocator())
                axis.xaxis.set_minor_formatter(NullFormatter())
                margin = (max(ticks) / min(ticks)) ** 0.08 if len(ticks) > 1 else 2
                axis.set_xlim(min(ticks) / margin, max(ticks) * margin)
            axis.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=30 if len(ticks) > 4 else 0)
        else:
            categories = sorted({str(t) for t in texts})
            xs = [categories.index(str(t)) for t in texts]
            axis.set_xticks(range(len(categories)), categories, rotation=20)
        others = [(x, r["value"]) for x, r in zip(xs, done) if r is not best]
        if others:
            axis.scatter([x for x, _ in others], [v for _, v in others], color="tab:blue", label="trial")
        if best is not None:
            x = xs[done.index(best)]
            axis.scatter([x], [best["value"]], color="tab:red", marker="*", s=160, zorder=3,
                         label=f"best: trial {best['num']} ({metric.split('/')[-1]} {best['value']:.4g})")
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    failed = len(records) - len(done)
    figure.suptitle(f"{metric} per trial ({len(done)} completed" + (f", {failed} failed)" if failed else ")"))
    return figure


def best_overrides_line(record: Dict[str, Any]) -> str:
    """The best trial's overrides as one line, runnable as `python -m orchestrator $(cat best_overrides.txt)`.
    A sweep file (+sweep=NAME) stays, for what else it sets, with hydra.mode=RUN: one run, not its sweep."""
    overrides = runnable_overrides(record["overrides"])
    if any(override_key(o) == "sweep" for o in overrides):
        overrides.append("hydra.mode=RUN")
    return " ".join(overrides) + "\n"


def link_best_export(sweep_dir: str, best: Dict[str, Any]) -> Dict[str, str]:
    """<sweep_dir>/best_export: a link to the best trial's export, the model the sweep hands back."""
    export = os.path.join(best["run_dir"], "export")
    if not os.path.isdir(export):
        return {}
    link = os.path.join(sweep_dir, "best_export")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.relpath(export, sweep_dir), link)
    return {"best_export": link}


def read_records(sweep_dir: str) -> List[Dict[str, Any]]:
    """Every trial.json directly below the sweep directory (all batches of the sweep so far)."""
    records = []
    for path in sorted(Path(sweep_dir).glob(f"*/{TRIAL_FILE}")):
        with open(path, encoding="utf-8") as handle:
            records.append(json.load(handle))
    return sorted(records, key=lambda r: r["num"])


def write_summary(sweep_dir: str, records: Sequence[Dict[str, Any]], mode: str) -> Dict[str, str]:
    """summary.csv, summary.md, metric_vs_params.png and (when a trial completed) best_overrides.txt in the
    sweep directory. Returns what was written, by kind, plus "table": the markdown text."""
    table = rows(records)
    best = best_trial(records, mode)
    written = {"table": to_markdown(table, best["num"] if best else None)}
    for kind, text in (("csv", to_csv(table)), ("markdown", written["table"])):
        path = os.path.join(sweep_dir, FILES[kind])
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        written[kind] = path
    picture = plot(records, os.path.join(sweep_dir, FILES["plot"]), best["num"] if best else None)
    if picture:
        written["plot"] = picture
    best_path = os.path.join(sweep_dir, FILES["best"])
    if best is not None:
        with open(best_path, "w", encoding="utf-8") as handle:
            handle.write(best_overrides_line(best))
        written["best"] = best_path
        written.update(link_best_export(sweep_dir, best))
    elif os.path.exists(best_path):
        os.remove(best_path)
    return written
