"""data.mix: several datasets of one task, drawn by weight; data.reference_path's rows (forgetting check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.config import DataConfig, MixEntry, ModelConfig, Task
from orchestrator.data import describe_data, encode_data, read_data
from orchestrator.data.batching import GlobalBatchSchedule, mix_row_weights
from orchestrator.errors import UserError
from orchestrator.model import load_tokenizer
from tests.conftest import compose_run, tiny_llama_run

LLM = [*tiny_llama_run(), "data.format=auto"]  # auto: each dataset its own format


def write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def text_rows(n: int, word: str):
    return [{"text": f"{word} number {i} is a short line of text."} for i in range(n)]


@pytest.fixture
def text_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "notes" / "train.jsonl", text_rows(12, "note"))


def test_mix_composes_from_the_command_line_and_reads_each_dataset(tmp_path, text_file):
    run = compose_run([*LLM, f"data.mix=[{{path:'sample:legal_instructions',weight:3}},"
                             f"{{path:'{text_file}',weight:1,validation_path:'{text_file}'}}]"], tmp_path)
    assert run.data.mix == [MixEntry("sample:legal_instructions", 3.0), MixEntry(text_file, 1.0, text_file)]
    raw = read_data(run.data, Task.causal_lm, seed=0)
    assert [(p.name, p.format.value, p.weight) for p in raw.parts] == [("legal_instructions", "alpaca", 3.0),
                                                                      ("notes", "text", 1.0)]
    assert len(raw.train) == sum(len(p.train) for p in raw.parts) and len(raw.parts[1].validation) == 12


def test_mix_data_report_shows_rows_and_weight_of_each_dataset(tmp_path, text_file):
    other = write_jsonl(tmp_path / "more.jsonl", text_rows(20, "more"))
    cfg = DataConfig(mix=[MixEntry(text_file, 1.0, text_file), MixEntry(other, 3.0)], cache=False,
                     reference_path="sample:general_reference")
    data = encode_data(read_data(cfg, Task.causal_lm, 0), load_tokenizer(ModelConfig(path="minilm")), 64)
    assert data.train_source == [0] * 12 + [1] * len(data.parts[1].train)
    report = describe_data(data)
    assert "mix of 2 datasets" in report
    assert "notes (text), weight 1 = 25% of the training rows:\n    train: 12 rows" in report
    assert "more (text), weight 3 = 75% of the training rows:\n    train: 18 rows" in report
    assert "reference (forgetting check): 40 rows" in report and len(data.reference) == 40


def test_drawn_share_of_each_dataset_follows_its_weight_and_is_deterministic():
    sizes, weights = [30, 300, 90], [2.0, 1.0, 1.0]  # the smallest dataset gets half of every batch
    source = [d for d, n in enumerate(sizes) for _ in range(n)]
    make = lambda: GlobalBatchSchedule(len(source), 32, seed=5, row_weights=mix_row_weights(source, weights))  # noqa
    schedule = make()
    drawn = torch.tensor([source[r] for step in range(400) for r in schedule.global_batch(step)])
    share = torch.bincount(drawn, minlength=3).double() / len(drawn)
    torch.testing.assert_close(share, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), atol=0.02, rtol=0)
    assert make().global_batch(123) == schedule.global_batch(123)  # a resumed run draws the same rows


def test_balanced_sampling_inside_a_mix_keeps_the_dataset_shares():
    source = [0] * 10 + [1] * 30
    classes = [0] * 9 + [1] + [0] * 15 + [1] * 15
    weights = mix_row_weights(source, [1.0, 3.0], classes)
    torch.testing.assert_close(weights[:10].sum() / weights.sum(), torch.tensor(0.25, dtype=torch.float64))
    assert weights[9] == weights[:9].sum()  # the rare class of dataset 0 is as likely as its common one


@pytest.mark.parametrize("mix, message", [
    ("[]", r"data.mix=\[\] is not allowed: a non-empty list"),
    ("[{path:'sample:legal_instructions',weight:0}]", r"data.mix\[0\].weight=0.0 is not allowed: a number > 0"),
    ("[{path:'sample:legal_instructions'},{path:'sample:legal_instructions',weight:-1}]",
     r"data.mix\[1\].weight=-1.0 is not allowed"),
])
def test_bad_mix_values_are_rejected(tmp_path, mix, message):
    with pytest.raises(UserError, match=message):
        compose_run([*LLM, f"data.mix={mix}"], tmp_path)


def test_validation_path_beside_a_mix_is_rejected(tmp_path):
    with pytest.raises(UserError, match=r"data.validation_path=.* null when data.mix is set"):
        compose_run([*LLM, "data.validation_path=x.jsonl", "data.mix=[{path:'sample:legal_instructions'}]"],
                    tmp_path)


def test_mix_of_different_tasks_names_the_entry():
    cfg = DataConfig(mix=[MixEntry("sample:legal_instructions"), MixEntry("sample:legal_clauses")])
    with pytest.raises(UserError, match=r"data.mix\[1\].path=sample:legal_clauses holds classification data"):
        read_data(cfg, Task.causal_lm, 0)


def test_classification_mix_needs_one_label_set(tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": f"row {i}", "label": "x" if i % 2 else "y"}
                                                   for i in range(10)])
    cfg = DataConfig(mix=[MixEntry("sample:legal_clauses"), MixEntry(other)])
    with pytest.raises(UserError, match=r"data.mix\[1\].path=.*other.jsonl has labels \['x', 'y'\].*share one label"):
        read_data(cfg, Task.classification, 0)


def test_reference_set_does_not_apply_to_classification(tmp_path):
    with pytest.raises(UserError, match=r"data.reference_path='sample:general_reference' is not allowed: null for "
                                        r"model.task=classification"):
        compose_run(["data.reference_path=sample:general_reference"], tmp_path)


def test_reference_set_reads_text_files_by_paragraph(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text("First paragraph,\nstill the first.\n\nSecond one.\n\n\n", encoding="utf-8")
    raw = read_data(DataConfig(path="sample:legal_instructions", reference_path=str(path)), Task.causal_lm, 0)
    assert [r.fields["text"] for r in raw.reference] == ["First paragraph,\nstill the first.", "Second one."]
