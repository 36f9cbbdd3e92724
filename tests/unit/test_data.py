"""Readers and encoders: each format parses, the label mask covers exactly the prompt, bad rows name file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.config import DataConfig, DataFormat, ModelConfig, Task
from orchestrator.data import encode_data, read_data
from orchestrator.data.batching import GlobalBatchSchedule, collate, shard_for_evaluation
from orchestrator.data.formats import IGNORE_INDEX, alpaca_prompt
from orchestrator.errors import UserError
from orchestrator.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(path="minilm"))


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_bundled_samples_parse_in_both_formats():
    clauses = read_data(DataConfig(path="sample:legal_clauses"), Task.classification, seed=0)
    assert clauses.format is DataFormat.classification
    assert len(clauses.labels) == 9 and "Other" in clauses.labels
    assert len(clauses.train) > 200 and len(clauses.validation) > 50
    instructions = read_data(DataConfig(path="sample:legal_instructions"), Task.causal_lm, seed=0)
    assert instructions.format is DataFormat.alpaca and instructions.labels is None


def test_csv_classification_and_held_out_split(tmp_path):
    path = tmp_path / "clauses.csv"
    rows = ["text,label"] + [f"\"clause number {i}, with a comma\",{'A' if i % 2 else 'B'}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = read_data(DataConfig(path=str(path), validation_fraction=0.25), Task.classification, seed=1)
    assert len(data.train) == 15 and len(data.validation) == 5
    assert data.train[0].fields["text"].startswith("clause number")
    assert data.labels == ["A", "B"]


def test_alpaca_mask_covers_exactly_the_prompt(tokenizer, tmp_path):
    row = {"instruction": "Classify the clause.", "input": "We may end your account at any time.",
           "output": "Unilateral termination"}
    path = write_jsonl(tmp_path / "train.jsonl", [row, row])
    data = encode_data(read_data(DataConfig(path=path, validation_path=path), Task.causal_lm, 0), tokenizer, 256)
    example = data.train[0]
    prompt_ids = tokenizer(alpaca_prompt(row))["input_ids"][:-1]  # without the closing [SEP]
    n = len(prompt_ids)
    assert example.input_ids[:n] == prompt_ids
    assert example.target[:n] == [IGNORE_INDEX] * n
    assert example.target[n:] == example.input_ids[n:]
    trained_text = tokenizer.decode(example.target[n:], skip_special_tokens=True)
    assert trained_text == "unilateral termination"  # the uncased WordPiece tokenizer lowercases
    assert example.target[-1] == tokenizer.sep_token_id  # end of response is learned too


def test_truncation_is_counted(tokenizer, tmp_path):
    rows = [{"text": "word " * 300, "label": "A"}, {"text": "short", "label": "B"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = encode_data(read_data(DataConfig(path=path, validation_path=path), Task.classification, 0), tokenizer, 32)
    assert data.train_report.truncated == 1
    assert max(len(e.input_ids) for e in data.train) == 32


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a", "label": "A"}', '{"text": "b", "label": "A"', '{"text": "c", "label": "B"}'],
     r"train.jsonl:2: not valid JSON"),
    (['{"text": "a", "label": "A"}', '{"text": "b"}'], r"train.jsonl:2: missing field 'label'"),
    (['{"text": "a", "label": "A"}', '{"text": "   ", "label": "B"}'],
     r"train.jsonl:2: field 'text' must be non-empty"),
    (['{"text": "a", "label": "A"}', '["a", "A"]'], r"train.jsonl:2: expected a JSON object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(UserError, match=message):
        read_data(DataConfig(path=path, validation_path=path, format=DataFormat.classification),
                  Task.classification, 0)


def test_unseen_validation_label_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "A"}])
    validation = write_jsonl(tmp_path / "validation.jsonl", [{"text": "b", "label": "Z"}])
    with pytest.raises(UserError, match=r"validation.jsonl:1: label 'Z' never occurs in the training data"):
        read_data(DataConfig(path=train, validation_path=validation), Task.classification, 0)


def test_format_and_task_must_agree():
    with pytest.raises(UserError, match="needs model.task=causal_lm"):
        read_data(DataConfig(path="sample:legal_instructions"), Task.classification, 0)


def test_non_utf8_file_is_reported(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "caf\xe9", "label": "A"}\n')
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_data(DataConfig(path=str(path), validation_path=str(path)), Task.classification, 0)


def test_schedule_splits_each_global_batch_over_ranks_and_accumulation():
    schedule = GlobalBatchSchedule(num_rows=10, global_batch_size=8, seed=3)
    for step in range(4):
        whole = schedule.global_batch(step)
        two_workers = [r for rank in range(2) for mb in schedule.micro_batches(step, rank, 2, 4) for r in mb]
        one_worker_accum = [r for mb in schedule.micro_batches(step, 0, 1, 4) for r in mb]
        assert sorted(two_workers) == sorted(whole) == sorted(one_worker_accum)
    # within an epoch no row repeats: the first 8 + the first 2 of the next batch are a permutation of 10
    assert sorted(schedule.global_batch(0) + schedule.global_batch(1)[:2]) == list(range(10))


def test_balanced_sampling_draws_classes_equally():
    classes = [0] * 90 + [1] * 10
    schedule = GlobalBatchSchedule(len(classes), 1000, seed=0, class_of_row=classes)
    drawn = torch.tensor([classes[i] for i in schedule.global_batch(0)])
    assert 0.4 < drawn.float().mean().item() < 0.6


def test_evaluation_shards_are_equal_length_and_cover_every_row():
    shards = [shard_for_evaluation(7, rank, 3) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert sorted(i for s in shards for i in s if i is not None) == list(range(7))


def test_collate_pads_right_and_masks_targets(tokenizer):
    from orchestrator.data.formats import Example

    batch = collate([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4], [IGNORE_INDEX])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX] * 3]


def test_length_sorted_micro_batches_keep_the_global_batch_and_group_similar_lengths():
    lengths = [5, 50, 7, 45, 6, 60, 8, 40, 9, 55]
    schedule = GlobalBatchSchedule(num_rows=10, global_batch_size=8, seed=1)
    for step in range(3):
        per_rank = [schedule.micro_batches(step, rank, 2, 2, lengths) for rank in range(2)]
        flat = [r for rank in per_rank for mb in rank for r in mb]
        assert sorted(flat) == sorted(schedule.global_batch(step))
        # accumulation step a on every rank holds the a-th shortest quarter of the global batch
        for a in range(1, 2):
            assert max(lengths[r] for rank in per_rank for r in rank[a - 1]) <= \
                min(lengths[r] for rank in per_rank for r in rank[a])
