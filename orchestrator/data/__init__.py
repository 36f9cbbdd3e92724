"""Datasets: read rows (readers), encode them per format (formats), batch them (batching).

data.mix reads several datasets of one task; each is read and encoded on its own (its own format and report),
then their rows are concatenated and `train_source` says which dataset each training example came from, so
that the batch schedule can draw every dataset by its weight and evaluation can report each one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

from orchestrator.config import DataConfig, DataFormat, Task
from orchestrator.data.batching import pack_examples
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
from orchestrator.data.readers import Row, read_reference
from orchestrator.data.sources import read_source, resolve
from orchestrator.errors import UserError


@dataclass
class RawData:
    """Rows checked for format and labels, before tokenization (cheap: the driver does this first)."""

    format: DataFormat
    train: List[Row]
    validation: List[Row]
    labels: Optional[List[str]]  # class names for classification
    config: DataConfig = field(default_factory=DataConfig)  # how to encode them (chat template, cache)
    name: str = ""  # short name of the dataset (data.mix: eval/<name>/loss)
    weight: float = 1.0  # data.mix: relative share of the training rows
    parts: List["RawData"] = field(default_factory=list)  # data.mix: the datasets, in order (else empty)
    reference: List[Row] = field(default_factory=list)  # data.reference_path: general text (forgetting check)
    origin: str = ""  # where the rows came from (the file, the save_to_disk directory, the cache; the registry)
    source: str = ""  # what data.path named: sample, file, directory, saved, hub, or registry (a name in one)


@dataclass
class Dataset:
    format: DataFormat
    train: List[Example]
    validation: List[Example]
    labels: Optional[List[str]]
    train_report: DataReport
    validation_report: DataReport
    name: str = ""
    weight: float = 1.0
    parts: List["Dataset"] = field(default_factory=list)  # data.mix: each dataset encoded on its own
    train_source: List[int] = field(default_factory=list)  # data.mix: index into parts of each train example
    reference: List[Example] = field(default_factory=list)  # data.reference_path, encoded as plain text
    reference_report: Optional[DataReport] = None


def read_data(cfg: DataConfig, task: Task, seed: int) -> RawData:
    """Rows of data.path, or of every data.mix dataset, plus data.reference_path's, checked for format."""
    if cfg.mix:
        raw = read_mix(cfg, task, seed)
    else:
        raw = read_dataset(cfg, task, seed)
    if cfg.reference_path:
        raw.reference = read_reference(cfg.reference_path)
        check_rows(raw.reference, DataFormat.text)
    return raw


def read_dataset(cfg: DataConfig, task: Task, seed: int, key: str = "data.path") -> RawData:
    """One dataset's rows (data.path in any of its forms: orchestrator/data/sources.py), checked for format."""
    given = cfg.path  # as the user wrote it (errors name it)
    source = resolve(cfg, key)
    rows = read_source(source, seed, key)
    train, validation = rows.train, rows.validation
    cfg = source.cfg  # a registry entry's format, split and columns merged in
    fmt = detect_format(train, cfg.format)
    if FORMAT_TASK[fmt] is not task:
        # a CSV file's format comes from its header: say so (a misnamed column is the usual cause)
        origin = f" (by the columns of its header, {train[0].header}: {sorted(train[0].fields)})" \
            if train[0].header and cfg.format is DataFormat.auto else ""
        raise UserError(f"{key}={given} holds {fmt.value} data{origin}, which needs model.task="
                        f"{FORMAT_TASK[fmt].value}, but model.task={task.value}")
    check_rows(train, fmt)
    check_rows(validation, fmt)
    if cfg.max_validation_rows is not None:
        validation = validation[: cfg.max_validation_rows]
    if not validation:
        raise UserError(f"{key}={given}: the validation set is empty (data.max_validation_rows="
                        f"{cfg.max_validation_rows}); every run evaluates on validation rows: give some")
    labels = None
    if fmt is DataFormat.classification:
        labels = label_names(train, validation, held_out=rows.held_out)
        if len(labels) < 2:  # every prediction would be right: a meaningless model with perfect scores
            raise UserError(f"{key}={given}: every training row has the label {labels[0]!r}; a classifier "
                            "needs rows of at least two classes (with one, it learns nothing and scores perfectly)")
    return RawData(fmt, train, validation, labels, cfg, name=source.name or dataset_name(source.location),
                   origin=rows.origin, source="registry" if source.registry else source.kind)


def read_mix(cfg: DataConfig, task: Task, seed: int) -> RawData:
    """Every data.mix dataset read as data.path would be (data.format applies to each: leave it auto to mix
    alpaca, chat and text). Classification datasets must share one label set: one head predicts them all."""
    parts = []
    for i, entry in enumerate(cfg.mix):
        part_cfg = dataclasses.replace(cfg, path=entry.path, validation_path=entry.validation_path, mix=None)
        part = read_dataset(part_cfg, task, seed, key=f"data.mix[{i}].path")
        part.weight = entry.weight
        parts.append(part)
    for i, part in enumerate(parts[1:], start=1):
        if part.labels != parts[0].labels:
            raise UserError(f"data.mix[{i}].path={part.config.path} has labels {part.labels}, but "
                            f"data.mix[0].path={parts[0].config.path} has {parts[0].labels}: the datasets of a "
                            "classification mix must share one label set")
    unique_names(parts)
    return RawData(parts[0].format, [r for p in parts for r in p.train], [r for p in parts for r in p.validation],
                   parts[0].labels, cfg, name="mix", parts=parts)


def origin_note(raw: RawData) -> str:
    """"data from: ..." for the data report where data.path was a name (a registry's, a hub id) or a Hugging Face
    dataset directory; empty where every dataset is a file, directory or sample given by its path (the command
    line says it already)."""
    parts = raw.parts or [raw]
    if all(p.source in ("sample", "file", "directory") for p in parts):
        return ""
    if not raw.parts:
        return f"data from: {raw.origin}"
    return "data from:\n" + "\n".join(f"  {p.name}: {p.origin}" for p in parts)


def dataset_name(path: str) -> str:
    """A short name for reports and metric keys: the sample's name, the directory's, or the file's stem
    (its directory's when the file is just train.jsonl)."""
    if path.startswith("sample:"):
        return path.removeprefix("sample:")
    path = path.rstrip("/")
    stem = os.path.splitext(os.path.basename(path))[0]
    if os.path.isfile(path) and stem in ("train", "data") and os.path.dirname(path):
        return os.path.basename(os.path.dirname(path))
    return stem


def unique_names(parts: List[RawData]) -> None:
    """Two datasets of one name (e.g. two train.jsonl of directories with the same name) get -2, -3, ..."""
    seen: dict = {}
    for part in parts:
        seen[part.name] = seen.get(part.name, 0) + 1
        if seen[part.name] > 1:
            part.name = f"{part.name}-{seen[part.name]}"


def encode_data(raw: RawData, tokenizer, max_length: Optional[int] = None) -> Dataset:
    """Tokenize (through the cache), one dataset at a time for a mix; data.reference_path as plain text."""
    max_length = max_length or raw.config.max_length
    if raw.parts:
        data = encode_mix(raw, tokenizer, max_length)
    else:
        data = encode_dataset(raw, tokenizer, max_length)
    if raw.reference:
        data.reference, data.reference_report = encode_reference(raw, tokenizer, max_length)
    return data


def encode_mix(raw: RawData, tokenizer, max_length: int) -> Dataset:
    parts = [encode_dataset(part, tokenizer, max_length) for part in raw.parts]
    train = [e for p in parts for e in p.train]
    source = [i for i, p in enumerate(parts) for _ in p.train]
    return Dataset(parts[0].format, train, [e for p in parts for e in p.validation], raw.labels,
                   merge_reports([p.train_report for p in parts]), merge_reports([p.validation_report for p in parts]),
                   name=raw.name, parts=parts, train_source=source)


def encode_reference(raw: RawData, tokenizer, max_length: int) -> tuple:
    cfg = raw.config
    fingerprint = tokenizer_fingerprint(tokenizer) if cfg.cache else ""
    settings = {"format": DataFormat.text.value, "max_length": max_length, "labels": None}
    return cached_encode(raw.reference, fingerprint, settings, lambda: encode_text(raw.reference, tokenizer,
                         max_length), cfg.cache_dir, cfg.cache)


def merge_reports(reports: List[DataReport]) -> DataReport:
    """The reports of a mix's datasets added up (counts summed, per-reason / per-label dicts merged)."""
    total = DataReport(cached=all(r.cached for r in reports))
    for report in reports:
        total.packed_length = max(total.packed_length, report.packed_length)
        for name in ("rows", "tokens", "truncated", "examples", "split", "trained_tokens", "packed_rows"):
            setattr(total, name, getattr(total, name) + getattr(report, name))
        for name in ("dropped", "label_counts"):
            merged = getattr(total, name)
            for key, n in getattr(report, name).items():
                merged[key] = merged.get(key, 0) + n
    return total


def encode_dataset(raw: RawData, tokenizer, max_length: Optional[int] = None) -> Dataset:
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
    if cfg.packing:  # after the cache: the cached examples stay unpacked, packing is cheap
        train = pack_examples(train, max_length)
        train_report = dataclasses.replace(train_report, packed_rows=len(train), packed_length=max_length)
    return Dataset(raw.format, train, validation, raw.labels, train_report, validation_report, name=raw.name,
                   weight=raw.weight)


def describe_data(data: Dataset) -> str:
    """The data report printed before training: rows, tokens, truncated and dropped rows, labels; for a mix,
    each dataset's lines and weight first; the forgetting check's reference set last."""
    lines = []
    if data.parts:
        total = sum(p.weight for p in data.parts)
        lines.append(f"data report (mix of {len(data.parts)} datasets, drawn by weight):")
        for part in data.parts:
            lines.append(f"  {part.name} ({part.format.value}), weight {part.weight:g} = {part.weight / total:.0%} "
                         "of the training rows:")
            lines += ["    " + part.train_report.describe("train").replace("\n", "\n    "),
                      "    " + part.validation_report.describe("validation").replace("\n", "\n    ")]
        lines.append("  all datasets:")
    else:
        lines.append(f"data report ({data.format.value}):")
    lines += ["  " + data.train_report.describe("train"), "  " + data.validation_report.describe("validation")]
    if data.reference_report is not None:
        lines.append("  " + data.reference_report.describe("reference (forgetting check)"))
    return "\n".join(lines)
