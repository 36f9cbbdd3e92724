"""Run plots: loss/learning-rate curves and the confusion matrix, written as PNG files into the run directory."""

from __future__ import annotations

import pytest

from orchestrator.plots import CONFUSION_FILE, CURVES_FILE, plot_confusion_matrix, save_run_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_classification_run_gets_curves_and_confusion_matrix(tmp_path):
    metrics = {"step": 50, "train/loss_history": [2.0 / (1 + 0.1 * i) for i in range(50)],
               "train/lr_history": [min(i / 5, 1) * 5e-5 for i in range(50)],
               "eval/confusion_matrix": [[5, 1, 0], [2, 7, 1], [0, 0, 4]], "eval/accuracy": 0.8,
               "eval_before/accuracy": 0.3}
    paths = save_run_plots(metrics, ["Other", "Liability", "Termination"], str(tmp_path))
    assert paths == [str(tmp_path / CURVES_FILE), str(tmp_path / CONFUSION_FILE)]
    for path in paths:
        assert open(path, "rb").read(8) == PNG_SIGNATURE
    width, height = png_size(paths[0])
    assert height > 500  # two panels: loss above learning rate


def test_causal_run_without_lr_history_gets_loss_curve_only(tmp_path):
    paths = save_run_plots({"step": 3, "train/loss_history": [3.0, 2.5, 2.2], "eval/perplexity": 9.0},
                           None, str(tmp_path / "run"))
    assert paths == [str(tmp_path / "run" / CURVES_FILE)]
    assert png_size(paths[0])[1] < 500  # one panel


def test_nothing_to_plot(tmp_path):
    assert save_run_plots({"eval/loss": 1.0}, ["A"], str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_confusion_matrix_must_match_labels(tmp_path):
    with pytest.raises(ValueError, match="for 3 labels"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b", "c"], str(tmp_path / "cm.png"))


# ---------------------------------------------------------------- plots a user would show a colleague (issue 15)

def test_training_curves_carry_the_run_name_and_the_evaluations():
    from orchestrator.plots import training_curves_figure

    evaluations = [[11, 0.31], [22, 0.52], [33, 0.61], [44, 0.58]]
    figure = training_curves_figure([2.0 / (1 + 0.1 * i) for i in range(44)], [1e-4] * 44, title="legal_demo (x)",
                                    evaluations=evaluations, metric="macro_f1", exported_step=33)
    assert figure.get_suptitle() == "legal_demo (x)"
    loss_axes = figure.axes[0]
    evaluation_axes = next(a for a in figure.axes if a is not loss_axes and a.get_ylabel().startswith("validation"))
    (line,) = [ln for ln in evaluation_axes.get_lines() if ln.get_label() == "validation macro_f1"]
    assert list(line.get_xdata()) == [11, 22, 33, 44] and list(line.get_ydata()) == [0.31, 0.52, 0.61, 0.58]
    legend = [t.get_text() for t in loss_axes.get_legend().get_texts()]
    assert "validation macro_f1" in legend and "exported (step 33)" in legend


def test_a_causal_run_puts_validation_loss_on_the_loss_axis():
    from orchestrator.plots import training_curves_figure

    figure = training_curves_figure([3.0, 2.5, 2.2, 2.0], None, evaluations=[[2, 2.6], [4, 2.3]], metric="loss")
    assert len(figure.axes) == 1
    assert "validation loss" in [ln.get_label() for ln in figure.axes[0].get_lines()]


def test_saved_plots_are_titled_with_the_run_and_the_matrix_leads_with_macro_f1(tmp_path, monkeypatch):
    from orchestrator import plots

    seen = {}
    real = plots.plot_confusion_matrix
    monkeypatch.setattr(plots, "plot_confusion_matrix",
                        lambda m, labels, path, title: seen.setdefault("title", title) and real(m, labels, path, title))
    run_dir = tmp_path / "runs" / "legal_demo" / "2026-12-01_12-00-00"
    metrics = {"step": 4, "train/loss_history": [1.0, 0.8, 0.7, 0.6], "select/history": [[2, 0.4], [4, 0.6]],
               "select/metric": "macro_f1", "select/exported_step": 4, "eval/confusion_matrix": [[3, 1], [0, 4]],
               "eval/macro_f1": 0.612, "eval_before/macro_f1": 0.1, "eval/accuracy": 0.875}
    paths = save_run_plots(metrics, ["Other", "Arbitration"], str(run_dir))
    assert len(paths) == 2
    assert seen["title"] == ("legal_demo (2026-12-01_12-00-00)\n"
                             "validation macro-F1 0.612 (before 0.100), accuracy 0.875")
    assert plots.run_title(str(run_dir), "named") == "named (2026-12-01_12-00-00)"
