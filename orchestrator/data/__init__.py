"""Datasets: read rows (readers), encode them per format (formats), batch them (batching)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from orchestrator.config import DataConfig, DataFormat, Task
from orchestrator.data.cache import cached_encode, tokenizer_fingerprint
from orchestrator.data.formats import (
    FORMAT_TASK,
    DataReport,
    Example,
    chat_template_for,
    check_rows,
    detect_format,
    encode_alpaca,
    encode_chat,
    encode_classification,
    encode_text,
    label_names,
)
from orchestrator.data.readers import Row, read_splits
from orchestrator.errors import UserError


@dataclass
class RawData:
    """Rows checked for format and labels, before tokenization (cheap: the driver does this first)."""

    format: DataFormat
    train: List[Row]
    validation: List[Row]
    labels: Optional[List[str]]  # class names for classification
    config: DataConfig = field(default_factory=DataConfig)  # how to encode them (chat template, cache)


@dataclass
class Dataset:
    format: DataFormat
    train: List[Example]
    validation: List[Example]
    labels: Optional[List[str]]
    train_report: DataReport
    validation_report: DataReport


def read_data(cfg: DataConfig, task: Task, seed: int) -> RawData:
    train, validation = read_splits(cfg.path, cfg.validation_path, cfg.validation_fraction, seed)
    fmt = detect_format(train, cfg.format)
    if FORMAT_TASK[fmt] is not task:
        raise UserError(f"data.path={cfg.path} holds {fmt.value} data, which needs model.task="
                        f"{FORMAT_TASK[fmt].value}, but model.task={task.value}")
    check_rows(train, fmt)
    check_rows(validation, fmt)
    if cfg.max_validation_rows is not None:
        validation = validation[: cfg.max_validation_rows]
    labels = label_names(train, validation) if fmt is DataFormat.classification else None
    return RawData(fmt, train, validation, labels, cfg)


def encode_data(raw: RawData, tokenizer, max_length: Optional[int] = None) -> Dataset:
    """Tokenize both splits through the on-disk cache (data.cache). Chat data: the template used (the
    tokenizer's own, or ChatML) is set on the tokenizer, so that an export saved with this tokenizer carries
    the template it was trained with (vLLM and predict render prompts with it)."""
    cfg = raw.config
    max_length = max_length or cfg.max_length
    settings = {"format": raw.format.value, "max_length": max_length, "labels": raw.labels}
    if raw.format is DataFormat.chat:
        template = chat_template_for(tokenizer, cfg.chat_template)
        tokenizer.chat_template = template
        settings["chat_template"] = template

    def encoder(rows):
        if raw.format is DataFormat.classification:
            return lambda: encode_classification(rows, tokenizer, raw.labels, max_length)
        if raw.format is DataFormat.chat:
            return lambda: encode_chat(rows, tokenizer, max_length, settings["chat_template"])
        if raw.format is DataFormat.text:
            return lambda: encode_text(rows, tokenizer, max_length)
        return lambda: encode_alpaca(rows, tokenizer, max_length)

    fingerprint = tokenizer_fingerprint(tokenizer) if cfg.cache else ""
    train, train_report = cached_encode(raw.train, fingerprint, settings, encoder(raw.train), cfg.cache_dir, cfg.cache)
    validation, validation_report = cached_encode(raw.validation, fingerprint, settings, encoder(raw.validation),
                                                  cfg.cache_dir, cfg.cache)
    return Dataset(raw.format, train, validation, raw.labels, train_report, validation_report)


def describe_data(data: Dataset) -> str:
    """The data report printed before training: rows, tokens, truncated and dropped rows, labels."""
    return "\n".join([f"data report ({data.format.value}):", "  " + data.train_report.describe("train"),
                      "  " + data.validation_report.describe("validation")])
