"""PNG plots of a finished run, saved in its run directory: loss and learning-rate curves, and the confusion
matrix of a classification run.

Pure functions of the run's final metrics (what metrics.json holds): "train/loss_history" (one value per
optimizer step), "train/lr_history" when present, "select/history" (the validation evaluations, [step, value] of
"select/metric"), "eval/confusion_matrix" for classification. Figures are
drawn on matplotlib's Agg canvas without pyplot, so nothing needs a display and no global state is touched.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"


def run_title(run_dir: str, name: Optional[str] = None) -> str:
    """The run as the plots name it: its name and its directory's last part (runs/<name>/<date_time>)."""
    leaf = os.path.basename(os.path.normpath(run_dir))
    name = name or os.path.basename(os.path.dirname(os.path.normpath(run_dir))) or leaf
    return f"{name} ({leaf})" if leaf and leaf != name else name


def save_run_plots(metrics: Dict, labels: Optional[Sequence[str]], run_dir: str,
                   name: Optional[str] = None) -> List[str]:
    """Every plot the metrics allow; returns the paths written (none for a run without loss history)."""
    paths = []
    title = run_title(run_dir, name)
    losses = metrics.get("train/loss_history") or []
    if losses:
        first_step = metrics.get("step", len(losses)) - len(losses) + 1  # a resumed run's history starts later
        paths.append(plot_training_curves(
            losses, metrics.get("train/lr_history"), os.path.join(run_dir, CURVES_FILE), start_step=first_step,
            title=title, evaluations=metrics.get("select/history"), metric=metrics.get("select/metric"),
            exported_step=metrics.get("select/exported_step")))
    matrix = metrics.get("eval/confusion_matrix")
    if matrix is not None and labels:
        paths.append(plot_confusion_matrix(matrix, labels, os.path.join(run_dir, CONFUSION_FILE),
                                           f"{title}\n{confusion_headline(metrics)}"))
    return paths


def confusion_headline(metrics: Dict) -> str:
    """Validation macro-F1 (the figure the README says to watch), before training, and accuracy beside it."""
    def figure(key: str) -> str:
        after, before = metrics.get(f"eval/{key}"), metrics.get(f"eval_before/{key}")
        if after is None:
            return ""
        return f"{key.replace('_', '-')} {after:.3f}" + (f" (before {before:.3f})" if before is not None else "")

    macro_f1 = figure("macro_f1").replace("macro-f1", "macro-F1")
    return "validation " + ", ".join(text for text in (macro_f1, figure("accuracy")) if text)


def plot_training_curves(losses: Sequence[float], lrs: Optional[Sequence[float]], path: str,
                         start_step: int = 1, title: Optional[str] = None,
                         evaluations: Optional[Sequence[Sequence[float]]] = None, metric: Optional[str] = None,
                         exported_step: Optional[int] = None) -> str:
    """training_curves_figure as a PNG at path."""
    return _save(training_curves_figure(losses, lrs, start_step, title, evaluations, metric, exported_step), path)


def training_curves_figure(losses: Sequence[float], lrs: Optional[Sequence[float]], start_step: int = 1,
                           title: Optional[str] = None, evaluations: Optional[Sequence[Sequence[float]]] = None,
                           metric: Optional[str] = None, exported_step: Optional[int] = None):
    """Training loss per step (with a moving average once there are enough steps) and the validation
    evaluations ([step, value] of `metric`: on the loss axis for a loss, else on a second axis, the exported
    one starred), titled with the run; below, on a shared step axis, the learning rate."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6 if lrs else 4), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title)
    steps = np.arange(start_step, start_step + len(losses))
    loss_axes = figure.add_subplot(2 if lrs else 1, 1, 1)
    loss_axes.plot(steps, losses, linewidth=1, color="tab:blue", alpha=0.45 if len(losses) >= 20 else 1.0,
                   label="training loss per step")
    window = len(losses) // 10 if len(losses) >= 20 else 1
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_axes.plot(steps[window - 1:], smooth, linewidth=2, color="navy", label=f"mean of {window} steps")
    loss_axes.set_ylabel("training loss")
    loss_axes.grid(alpha=0.3)
    handles_axes = [loss_axes]
    if evaluations:
        metric = metric or "metric"
        on_loss_axis = metric in ("loss", "eval/loss")
        eval_axes = loss_axes if on_loss_axis else loss_axes.twinx()
        xs, ys = [e[0] for e in evaluations], [e[1] for e in evaluations]
        eval_axes.plot(xs, ys, marker="o", color="tab:orange", linewidth=1.5, label=f"validation {metric}")
        if exported_step is not None and exported_step in xs:
            eval_axes.scatter([exported_step], [ys[xs.index(exported_step)]], marker="*", s=200, color="tab:red",
                              zorder=4, label=f"exported (step {exported_step})")
        if not on_loss_axis:
            eval_axes.set_ylabel(f"validation {metric}", color="tab:orange")
            handles_axes.append(eval_axes)
    handles, texts = [], []
    for axes in handles_axes:
        h, t = axes.get_legend_handles_labels()
        handles += h
        texts += t
    if len(handles) > 1:  # above the panels, where no curve runs
        loss_axes.legend(handles, texts, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                         ncols=min(len(handles), 4), frameon=False)
    if lrs:
        lr_axes = figure.add_subplot(2, 1, 2, sharex=loss_axes)
        last = start_step + len(losses) - 1  # both histories end at the last step, whatever their lengths
        lr_axes.plot(np.arange(last - len(lrs) + 1, last + 1), lrs, color="tab:green")
        lr_axes.set_ylabel("learning rate")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lr_axes.grid(alpha=0.3)
        lr_axes.set_xlabel("optimizer step")
    else:
        loss_axes.set_xlabel("optimizer step")
    return figure


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str,
                          title: str = "validation") -> str:
    """Counts per (true, predicted) class, drawn by scikit-learn's ConfusionMatrixDisplay."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix)
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix of shape {matrix.shape} for {len(labels)} labels")
    size = max(5.0, 0.6 * len(labels) + 3)
    figure = Figure(figsize=(size, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ConfusionMatrixDisplay(matrix, display_labels=list(labels)).plot(ax=axes, xticks_rotation="vertical",
                                                                     colorbar=False, values_format="d", cmap="Blues")
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def _save(figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
