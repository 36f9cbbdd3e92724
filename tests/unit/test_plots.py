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
