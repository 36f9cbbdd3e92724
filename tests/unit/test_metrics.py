"""Metrics on fixed predictions against values worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from orchestrator.config import Task
from orchestrator.data.formats import IGNORE_INDEX, Example
from orchestrator.metrics import classification_metrics, confusion, evaluate


def test_accuracy_and_macro_f1_on_fixed_predictions():
    # true:      0 0 0 1 1 2
    # predicted: 0 0 1 1 1 0
    # class 0: tp 2, fp 1, fn 1 → F1 2/3; class 1: tp 2, fp 1, fn 0 → F1 4/5; class 2: tp 0 → F1 0
    metrics = classification_metrics([0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 2])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)


def test_confusion_matrix_rows_are_true_classes_and_keep_absent_classes():
    assert confusion([0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 2], num_classes=4) == \
        [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are looked up by the first input id: predictions known in advance."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_evaluate_classification_with_confusion_matrix():
    # rows 0..4 with gold classes; the model predicts class argmax(table[first id])
    table = [[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]]
    examples = [Example([0, 5], 0), Example([1, 5], 1), Example([2, 5], 1), Example([1], 1), Example([0], 1)]
    metrics = evaluate(FixedLogits(table), examples, Task.classification, batch_size=2, pad_token_id=0,
                       device=torch.device("cpu"), with_confusion=True)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["confusion_matrix"] == [[1, 0], [2, 2]]
    confident, wrong = -math.log(math.exp(3) / (math.exp(3) + 1)), -math.log(1 / (math.exp(3) + 1))
    assert metrics["loss"] == pytest.approx((3 * confident + 2 * wrong) / 5, rel=1e-5)
    plain = evaluate(FixedLogits(table), examples, Task.classification, 2, 0, torch.device("cpu"))
    assert "confusion_matrix" not in plain


class UniformLM(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    examples = [Example([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]), Example([5, 6], [IGNORE_INDEX, 6])]
    metrics = evaluate(UniformLM(50), examples, Task.causal_lm, 2, 0, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(math.log(50))
    assert metrics["perplexity"] == pytest.approx(50)


def test_rouge_l_and_bleu_on_fixed_strings():
    from orchestrator.metrics import generation_metrics

    perfect = generation_metrics(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert perfect == {"rougeL": pytest.approx(1.0), "bleu": pytest.approx(100.0)}
    # hypothesis "the cat sat on the mat" vs reference "the cat is on the mat" (6 words each):
    # ROUGE-L: LCS "the cat on the mat" = 5 → P = R = F = 5/6
    # BLEU: n-gram precisions 5/6, 3/5, 1/4 and 0/3 (sacrebleu's exp smoothing: 1/(2*3)); brevity penalty 1
    metrics = generation_metrics(["the cat sat on the mat"], ["the cat is on the mat"])
    assert metrics["rougeL"] == pytest.approx(5 / 6)
    assert metrics["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, rel=1e-4)
    # ROUGE-L is the mean over rows: 1 and 0
    assert generation_metrics(["a b", "x"], ["a b", "y"])["rougeL"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        generation_metrics(["a"], [])


def test_generative_classification_parses_answers_to_labels():
    from orchestrator.metrics import generative_classification_metrics

    labels = ["Arbitration", "Liability", "Other"]
    predictions = ["arbitration", " Liability.", "Other", "no idea", "Liability"]
    references = ["Arbitration", "Liability", "Liability", "Other", "Liability"]
    metrics = generative_classification_metrics(predictions, references, labels)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["unparsed"] == pytest.approx(1 / 5)
    # Arbitration: F1 1; Liability: tp 2, fp 0, fn 1 → 4/5; Other: tp 0 → 0
    assert metrics["macro_f1"] == pytest.approx((1 + 4 / 5 + 0) / 3)
    with pytest.raises(ValueError, match="not one of the labels"):
        generative_classification_metrics(["A"], ["Z"], labels)


def test_samples_for_the_log():
    from orchestrator.metrics import format_samples

    text = format_samples(["p1", "p2", "p3", "p4"], ["g1", "g2", "g3", "g4"], ["r1", "r2", "r3", "r4"], count=2)
    assert text == "sample 1\n  prompt:    p1\n  generated: g1\n  reference: r1\n" \
                   "sample 2\n  prompt:    p2\n  generated: g2\n  reference: r2"
    assert format_samples(["x " * 400], ["g"], ["r"], width=20).splitlines()[1].endswith("x x…")
