"""The tokenization cache: a second encode of the same data is a hit with identical examples; a change to the
content, the tokenizer or the settings misses; concurrent writers leave one complete entry."""

from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.config import DataConfig, ModelConfig, Task
from orchestrator.data import cache, encode_data, formats, read_data
from orchestrator.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(path="minilm"))


@pytest.fixture()
def calls(monkeypatch):
    """Counts real tokenization passes (encoder calls) per format."""
    counts = {}
    for name in ("encode_classification", "encode_alpaca", "encode_chat", "encode_text"):
        original = getattr(formats, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(f"orchestrator.data.{name}", counting)
    cache.STATS.clear()
    return counts


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def raw_data(path: str, task: Task, cache_dir: Path, **config):
    return read_data(DataConfig(path=path, validation_path=path, cache_dir=str(cache_dir), **config), task, 0)


@pytest.mark.parametrize("rows,task,encoder", [
    ([{"text": f"clause {i}", "label": "AB"[i % 2]} for i in range(6)], Task.classification, "encode_classification"),
    ([{"instruction": "Say", "input": str(i), "output": f"ok {i}"} for i in range(4)], Task.causal_lm,
     "encode_alpaca"),
    ([{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
      for i in range(4)], Task.causal_lm, "encode_chat"),
    ([{"text": "word " * (3 + i)} for i in range(4)], Task.causal_lm, "encode_text"),
])
def test_second_encode_is_a_cache_hit_with_identical_examples(tmp_path, tokenizer, calls, rows, task, encoder):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    # validation = train here: its encode is already a hit in the first run
    first = encode_data(raw_data(path, task, tmp_path / "cache"), copy.deepcopy(tokenizer), 64)
    assert calls[encoder] == 1 and cache.STATS == {"miss": 1, "hit": 1} and not first.train_report.cached
    second = encode_data(raw_data(path, task, tmp_path / "cache"), copy.deepcopy(tokenizer), 64)
    assert calls[encoder] == 1, "the second run tokenized again"
    assert cache.STATS["hit"] == 3 and second.train_report.cached and second.validation_report.cached
    assert second.train == first.train and second.validation == first.validation
    assert {**vars(second.train_report), "cached": False} == vars(first.train_report)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_key_follows_content_tokenizer_and_settings(tmp_path, tokenizer, calls):
    rows = [{"text": f"clause {i}", "label": "AB"[i % 2]} for i in range(4)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    store = tmp_path / "cache"
    encode_data(raw_data(path, Task.classification, store), tokenizer, 16)
    # the same rows in a renamed file: a hit
    moved = write_jsonl(tmp_path / "moved.jsonl", rows)
    encode_data(raw_data(moved, Task.classification, store), tokenizer, 16)
    assert calls["encode_classification"] == 1  # (validation = train: one tokenization per run)
    # another max_length, an edited row, a changed tokenizer: misses
    encode_data(raw_data(path, Task.classification, store), tokenizer, 12)
    assert calls["encode_classification"] == 2
    edited = write_jsonl(tmp_path / "edited.jsonl", rows[:-1] + [{"text": "clause 3!", "label": "B"}])
    encode_data(raw_data(edited, Task.classification, store), tokenizer, 16)
    assert calls["encode_classification"] == 3
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["clause"])
    encode_data(raw_data(path, Task.classification, store), other, 16)
    assert calls["encode_classification"] == 4


def test_cache_can_be_turned_off(tmp_path, tokenizer, calls):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b c"}])
    for _ in range(2):
        encode_data(raw_data(path, Task.causal_lm, tmp_path / "cache", cache=False), tokenizer, 16)
    assert calls["encode_text"] == 4 and not (tmp_path / "cache").exists()


def test_default_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "elsewhere"))
    assert cache.default_cache_dir() == str(tmp_path / "elsewhere")


def test_concurrent_writers_leave_one_complete_entry(tmp_path, tokenizer):
    """Workers of one node encoding at once: each writes a temporary file and renames it into place."""
    rows = [{"text": f"document number {i} " * 5} for i in range(50)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = raw_data(path, Task.causal_lm, tmp_path / "cache")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: encode_data(raw, copy.deepcopy(tokenizer), 32), range(4)))
    assert all(r.train == results[0].train for r in results)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".npz")] == []
    again = encode_data(raw, tokenizer, 32)
    assert again.train_report.cached and again.train == results[0].train


def test_damaged_entry_is_rebuilt(tmp_path, tokenizer, calls):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b c"}])
    encode_data(raw_data(path, Task.causal_lm, tmp_path / "cache"), tokenizer, 16)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(b"garbage")
    data = encode_data(raw_data(path, Task.causal_lm, tmp_path / "cache"), tokenizer, 16)
    assert calls["encode_text"] == 2 and not data.train_report.cached
    assert os.path.getsize(entry) > 100  # rewritten
