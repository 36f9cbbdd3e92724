"""Datasets: read rows (readers), encode them per format (formats), batch them (batching)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from orchestrator.config import DataConfig, DataFormat, Task
from orchestrator.data.formats import (
    FORMAT_TASK,
    DataReport,
    Example,
    check_rows,
    detect_format,
    encode_alpaca,
    encode_classification,
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
    return RawData(fmt, train, validation, labels)


def encode_data(raw: RawData, tokenizer, max_length: int) -> Dataset:
    if raw.format is DataFormat.classification:
        train, train_report = encode_classification(raw.train, tokenizer, raw.labels, max_length)
        validation, validation_report = encode_classification(raw.validation, tokenizer, raw.labels, max_length)
    else:
        train, train_report = encode_alpaca(raw.train, tokenizer, max_length)
        validation, validation_report = encode_alpaca(raw.validation, tokenizer, max_length)
    return Dataset(raw.format, train, validation, raw.labels, train_report, validation_report)
