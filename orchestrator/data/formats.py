"""Turn rows of each supported format into token ids and training targets.

- classification: {"text", "label"} → input_ids + class index.
- alpaca: {"instruction", "input", "output"} → prompt + response tokens; the loss mask (-100) covers
  exactly the prompt, so the model learns to write responses, not to repeat instructions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from orchestrator.config import DataFormat, Task
from orchestrator.data.readers import Row
from orchestrator.errors import UserError

IGNORE_INDEX = -100  # positions the loss skips (PyTorch cross-entropy convention)

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

_FIELDS = {
    DataFormat.classification: ("text", "label"),
    DataFormat.alpaca: ("instruction", "output"),  # "input" is optional
}
FORMAT_TASK = {DataFormat.classification: Task.classification, DataFormat.alpaca: Task.causal_lm}


@dataclass
class Example:
    input_ids: List[int]
    target: Any  # class index (classification) or per-token labels with IGNORE_INDEX on the prompt


@dataclass
class DataReport:
    """What happened to the rows on the way to the model, shown before training."""

    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)  # reason → count
    label_counts: Dict[str, int] = field(default_factory=dict)


def detect_format(rows: Sequence[Row], requested: DataFormat) -> DataFormat:
    if requested is not DataFormat.auto:
        return requested
    keys = set(rows[0].fields)
    for fmt, required in _FIELDS.items():
        if set(required) <= keys:
            return fmt
    raise UserError(f"{rows[0].where}: cannot tell the data format from fields {sorted(keys)}; expected "
                    "classification (text, label) or alpaca (instruction, input, output); or set data.format")


def check_rows(rows: Sequence[Row], fmt: DataFormat) -> None:
    """Every row has the format's fields, as non-empty text."""
    for row in rows:
        for key in _FIELDS[fmt]:
            value = row.fields.get(key)
            if value is None:
                raise UserError(f"{row.where}: missing field {key!r} required by data.format={fmt.value}")
            if not isinstance(value, (str, int)) or not str(value).strip():
                raise UserError(f"{row.where}: field {key!r} must be non-empty text, got {value!r}")


def label_names(train: Sequence[Row], validation: Sequence[Row]) -> List[str]:
    """Class names in sorted order; a validation label that train never saw is an error."""
    names = sorted({str(r.fields["label"]) for r in train})
    known = set(names)
    for row in validation:
        if str(row.fields["label"]) not in known:
            raise UserError(f"{row.where}: label {row.fields['label']!r} never occurs in the training data "
                            f"(train labels: {', '.join(names)})")
    return names


def encode_classification(rows: Sequence[Row], tokenizer, labels: List[str], max_length: int) -> tuple:
    index = {name: i for i, name in enumerate(labels)}
    report = DataReport(rows=len(rows))
    examples = []
    for row in rows:
        ids = tokenizer(str(row.fields["text"]), add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            report.truncated += 1
            ids = ids[: max_length - 1] + ids[-1:]  # keep the closing special token ([SEP] / </s>)
        label = str(row.fields["label"])
        examples.append(Example(ids, index[label]))
        report.tokens += len(ids)
        report.label_counts[label] = report.label_counts.get(label, 0) + 1
    return examples, report


def alpaca_prompt(fields: Dict[str, Any]) -> str:
    template = ALPACA_PROMPT if str(fields.get("input") or "").strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=str(fields["instruction"]).strip(), input=str(fields.get("input", "")).strip())


def encode_alpaca(rows: Sequence[Row], tokenizer, max_length: int) -> tuple:
    eos: Optional[int] = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    report = DataReport(rows=len(rows))
    examples = []
    dropped: Counter = Counter()
    for row in rows:
        # Prompt and response are tokenized apart so that the mask boundary is exact.
        prompt = tokenizer(alpaca_prompt(row.fields), add_special_tokens=True)["input_ids"]
        if tokenizer.sep_token_id is not None and prompt and prompt[-1] == tokenizer.sep_token_id:
            prompt = prompt[:-1]  # BERT-style tokenizers close every text with [SEP]: not inside a prompt
        response = tokenizer(str(row.fields["output"]), add_special_tokens=False)["input_ids"]
        response = response + ([eos] if eos is not None else [])
        ids = prompt + response
        if len(ids) > max_length:
            report.truncated += 1
            ids = ids[:max_length]
        targets = [IGNORE_INDEX] * min(len(prompt), len(ids)) + ids[len(prompt):]
        if all(t == IGNORE_INDEX for t in targets[1:]):
            dropped["prompt longer than data.max_length"] += 1
            continue
        examples.append(Example(ids, targets))
        report.tokens += len(ids)
    report.dropped = dict(dropped)
    if not examples:
        raise UserError(f"no usable rows in {rows[0].where.rsplit(':', 1)[0]}: every prompt is longer than "
                        f"data.max_length={max_length}; raise data.max_length")
    return examples, report
