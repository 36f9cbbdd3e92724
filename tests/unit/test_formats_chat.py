"""Chat (OpenAI messages / ShareGPT conversations) and plain-text formats: detection, the assistant-only loss
mask checked token by token, malformed rows named by file:line, CSV beside JSONL."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from orchestrator.config import DataConfig, DataFormat, ModelConfig, Task
from orchestrator.data import describe_data, encode_data, read_data
from orchestrator.data.formats import CHATML_TEMPLATE, IGNORE_INDEX, detect_format
from orchestrator.data.readers import Row
from orchestrator.errors import UserError
from orchestrator.model import load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "Bye now."}]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CHAT]

# A Llama-3-shaped template whose markers are single special tokens, as in real chat tokenizers.
HEADER_TEMPLATE = ("[CLS]{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def _minilm():
    return load_tokenizer(ModelConfig(path="minilm"))


@pytest.fixture()
def tokenizer(_minilm):
    """A fresh copy per test: encoding chat data sets the template it used on the tokenizer."""
    return copy.deepcopy(_minilm)


@pytest.fixture()
def chat_tokenizer(_minilm):
    """The WordPiece tokenizer with chat special tokens and its own chat template."""
    tok = copy.deepcopy(_minilm)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = HEADER_TEMPLATE
    return tok


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def encode(tmp_path, rows, tokenizer, max_length=256, **config):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(path=path, validation_path=path, cache=False, **config)
    return encode_data(read_data(cfg, Task.causal_lm, 0), tokenizer, max_length)


def trained(tokenizer, example):
    """The tokens the loss covers, as token strings."""
    return [tokenizer.convert_ids_to_tokens(t) for t in example.target if t != IGNORE_INDEX]


@pytest.mark.parametrize("fields,expected", [
    ({"messages": []}, DataFormat.chat),
    ({"conversations": []}, DataFormat.chat),
    ({"text": "a", "label": "A"}, DataFormat.classification),  # has "text" too: still classification
    ({"instruction": "a", "input": "", "output": "b"}, DataFormat.alpaca),
    ({"text": "a"}, DataFormat.text),
    ({"text": "a", "source": "web"}, DataFormat.text),
])
def test_format_is_detected_from_the_first_row(fields, expected):
    assert detect_format([Row(fields, "f:1")], DataFormat.auto) is expected


def test_chatml_fallback_trains_exactly_the_assistant_turns(tokenizer, tmp_path):
    data = encode(tmp_path, [{"messages": CHAT}], tokenizer)
    assert data.format is DataFormat.chat
    example = data.train[0]
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    end = ["<", "|", "im", "_", "end", "|", ">"]
    start = ["<", "|", "im", "_", "start", "|", ">"]
    # hand-checked: the WordPiece tokenizer splits ChatML markers into pieces and lowercases
    assert tokens == (["[CLS]"] + start + ["system", "be", "brief", "."] + end
                      + start + ["user", "hi", "there"] + end
                      + start + ["assistant", "hello", "!"] + end
                      + start + ["user", "bye"] + end
                      + start + ["assistant", "bye", "now", "."] + end)  # no closing [SEP]
    assert trained(tokenizer, example) == ["hello", "!"] + end + ["bye", "now", "."] + end
    # the mask is positional: targets equal the ids where trained
    assert all(t in (IGNORE_INDEX, i) for t, i in zip(example.target, example.input_ids))
    first = tokens.index("hello")
    assert example.target[first - 1] == IGNORE_INDEX and example.target[first] == example.input_ids[first]
    assert data.train_report.trained_tokens == 19


def test_tokenizer_template_is_used_and_its_special_tokens_kept_whole(chat_tokenizer, tmp_path):
    example = encode(tmp_path, [{"messages": CHAT}], chat_tokenizer).train[0]
    tokens = chat_tokenizer.convert_ids_to_tokens(example.input_ids)
    assert tokens[:4] == ["[CLS]", "<|start_header_id|>", "system", "<|end_header_id|>"]
    assert tokens.count("[CLS]") == 1 and "[SEP]" not in tokens  # the template's own; none added
    assert trained(chat_tokenizer, example) == ["hello", "!", "<|eot_id|>", "bye", "now", ".", "<|eot_id|>"]


def test_sharegpt_and_openai_rows_encode_identically(tokenizer, tmp_path):
    a = encode(tmp_path, [{"messages": CHAT}], tokenizer).train[0]
    b = encode(tmp_path, [{"conversations": SHAREGPT}], tokenizer).train[0]
    assert a == b


def test_chat_template_is_set_on_the_tokenizer_for_the_export(tokenizer, tmp_path):
    tok = tokenizer
    assert tok.chat_template is None
    encode(tmp_path, [{"messages": CHAT}], tok)
    assert tok.chat_template == CHATML_TEMPLATE
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_can_be_forced_over_the_tokenizer_template(chat_tokenizer, tmp_path):
    example = encode(tmp_path, [{"messages": CHAT}], chat_tokenizer, chat_template="chatml").train[0]
    assert "<|start_header_id|>" not in chat_tokenizer.convert_ids_to_tokens(example.input_ids)


def test_rows_without_usable_assistant_turns_are_dropped_with_reasons(tokenizer, tmp_path):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]},
            {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}]
    data = encode(tmp_path, rows, tokenizer, max_length=50)
    report = data.train_report
    assert report.rows == 3 and report.examples == 1 and len(data.train) == 1
    assert report.dropped == {"no assistant turn": 1, "assistant turns beyond data.max_length": 1}
    assert report.truncated == 2  # the long one, and the first (87 tokens) cut to 50, inside its first answer
    assert "dropped: 1 assistant turns beyond data.max_length, 1 no assistant turn" in describe_data(data)


def test_truncation_keeps_the_assistant_tokens_before_the_cut(tokenizer, tmp_path):
    # the first answer is tokens 44..52 ("hello", "!", 7 pieces of <|im_end|>): cut right after it
    example = encode(tmp_path, [{"messages": CHAT}], tokenizer, max_length=53).train[0]
    assert len(example.input_ids) == 53
    assert trained(tokenizer, example) == ["hello", "!", "<", "|", "im", "_", "end", "|", ">"]


@pytest.mark.parametrize("row,message", [
    ({"messages": "not a list"}, r"train.jsonl:2: field 'messages' is text but not a JSON list"),
    ({"messages": []}, r"train.jsonl:2: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, r"train.jsonl:2: messages\[0\] has role 'wizard'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"train.jsonl:2: messages\[0\] content must be text"),
    ({"conversations": [{"from": "human"}]}, r"train.jsonl:2: conversations\[0\] needs 'role' and 'content'"),
    ({"conversations": ["hi"]}, r"train.jsonl:2: conversations\[0\] must be an object"),
])
def test_malformed_chat_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(UserError, match=message):
        read_data(DataConfig(path=path, validation_path=path), Task.causal_lm, 0)


def test_template_failure_is_a_user_error(tokenizer, tmp_path):
    template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}" \
               "{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match=r"train.jsonl:1: the chat template failed.*no system"):
        encode(tmp_path, [{"messages": CHAT}], tokenizer, chat_template=template)


def test_chat_rows_in_csv(tokenizer, tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(CHAT)])
        writer.writerow([json.dumps(CHAT[1:3])])
    data = encode_data(read_data(DataConfig(path=str(path), validation_path=str(path), cache=False),
                                 Task.causal_lm, 0), tokenizer, 256)
    assert data.format is DataFormat.chat and len(data.train) == 2
    assert trained(tokenizer, data.train[1]) == ["hello", "!", "<", "|", "im", "_", "end", "|", ">"]


def test_plain_text_trains_every_token_and_splits_long_documents(tokenizer, tmp_path):
    rows = [{"text": "The lessee shall pay rent."}, {"text": " ".join(["clause"] * 25)}]
    data = encode(tmp_path, rows, tokenizer, max_length=10)
    assert data.format is DataFormat.text
    first = data.train[0]
    assert tokenizer.convert_ids_to_tokens(first.input_ids) == \
        ["[CLS]", "the", "less", "##ee", "shall", "pay", "rent", ".", "[SEP]"]
    assert first.target == first.input_ids  # loss on all tokens ([SEP] is the end of the document)
    # 25 words + [CLS] + [SEP] = 27 tokens → pieces of 10, 10, 7
    assert [len(e.input_ids) for e in data.train[1:]] == [10, 10, 7]
    assert data.train_report.split == 1 and data.train_report.examples == 4 and data.train_report.truncated == 0


def test_plain_text_needs_a_causal_lm():
    with pytest.raises(UserError, match="holds text data, which needs model.task=causal_lm"):
        read_data(DataConfig(path="sample:legal_clauses", format=DataFormat.text), Task.classification, 0)


def test_plain_text_rows_must_have_text(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": ""}])
    with pytest.raises(UserError, match=r"train.jsonl:2: field 'text' must be non-empty"):
        read_data(DataConfig(path=path, validation_path=path), Task.causal_lm, 0)
