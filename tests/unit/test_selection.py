"""Model selection bookkeeping (orchestrator/selection.py)."""

from __future__ import annotations

import torch

from orchestrator.selection import Selection, WeightSnapshot, lower_is_better


def test_direction_of_each_metric():
    assert lower_is_better("loss") and lower_is_better("eval/perplexity") and lower_is_better("mix/loss")
    assert not lower_is_better("macro_f1") and not lower_is_better("accuracy") and not lower_is_better("rougeL")


def test_best_and_evaluations_since():
    selection = Selection("macro_f1")
    assert selection.observe(10, 0.3) and selection.observe(20, 0.5)
    assert not selection.observe(30, 0.5) and not selection.observe(40, float("nan"))
    assert (selection.best_step, selection.best_value, selection.evaluations_since_best) == (20, 0.5, 2)
    loss = Selection("loss")
    assert loss.observe(1, 2.0) and loss.observe(2, 1.5) and not loss.observe(3, 1.7)


def test_checkpoints_carry_the_selection_of_the_same_metric_only():
    selection = Selection("loss", 1.2, 40, 1)
    assert Selection.from_notes(selection.to_notes(), "loss") == selection
    assert Selection.from_notes(selection.to_notes(), "macro_f1") == Selection("macro_f1")


class _Engine:
    def __init__(self, module):
        self.module = module


def test_snapshot_puts_the_trainable_weights_back():
    module = torch.nn.Linear(3, 2)
    module.bias.requires_grad_(False)
    snapshot = WeightSnapshot(_Engine(module))
    assert not snapshot.put_back()  # nothing taken yet
    before = module.weight.detach().clone()
    snapshot.take()
    with torch.no_grad():
        module.weight.add_(1.0)
    assert snapshot.put_back()
    torch.testing.assert_close(module.weight, before)


def test_the_final_weights_win_a_tie():
    selection = Selection("macro_f1")
    selection.observe(10, 0.5)
    assert not selection.observe(20, 0.5) and selection.observe(30, 0.5, ties_win=True)
    assert selection.best_step == 30
