"""PNG plots of a finished run, saved in its run directory: loss and learning-rate curves, and the confusion
matrix of a classification run.

Pure functions of the run's final metrics (what metrics.json holds): "train/loss_history" (one value per
optimizer step), "train/lr_history" when present, "eval/confusion_matrix" for classification. Figures are
drawn on matplotlib's Agg canvas without pyplot, so nothing needs a display and no global state is touched.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"


def save_run_plots(metrics: Dict, labels: Optional[Sequence[str]], run_dir: str) -> List[str]:
    """Every plot the metrics allow; returns the paths written (none for a run without loss history)."""
    paths = []
    losses = metrics.get("train/loss_history") or []
    if losses:
        first_step = metrics.get("step", len(losses)) - len(losses) + 1  # a resumed run's history starts later
        paths.append(plot_training_curves(losses, metrics.get("train/lr_history"), os.path.join(run_dir, CURVES_FILE),
                                          start_step=first_step))
    matrix = metrics.get("eval/confusion_matrix")
    if matrix is not None and labels:
        before = metrics.get("eval_before/accuracy")
        title = f"validation accuracy {metrics.get('eval/accuracy', float('nan')):.3f}"
        if before is not None:
            title += f" (before {before:.3f})"
        paths.append(plot_confusion_matrix(matrix, labels, os.path.join(run_dir, CONFUSION_FILE), title))
    return paths


def plot_training_curves(losses: Sequence[float], lrs: Optional[Sequence[float]], path: str,
                         start_step: int = 1) -> str:
    """Training loss per step (with a moving average once there are enough steps) and, below it on a
    shared step axis, the learning rate."""
    figure = Figure(figsize=(8, 6 if lrs else 4), layout="constrained")
    FigureCanvasAgg(figure)
    steps = np.arange(start_step, start_step + len(losses))
    loss_axes = figure.add_subplot(2 if lrs else 1, 1, 1)
    loss_axes.plot(steps, losses, linewidth=1, alpha=0.5 if len(losses) >= 20 else 1.0, label="loss per step")
    window = len(losses) // 10 if len(losses) >= 20 else 1
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_axes.plot(steps[window - 1:], smooth, linewidth=2, label=f"mean of {window} steps")
        loss_axes.legend()
    loss_axes.set_ylabel("training loss")
    loss_axes.grid(alpha=0.3)
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
    return _save(figure, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str,
                          title: str = "validation") -> str:
    """Counts per (true, predicted) class, drawn by scikit-learn's ConfusionMatrixDisplay."""
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


def _save(figure: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
