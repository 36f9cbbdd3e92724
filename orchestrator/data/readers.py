"""Read rows from JSONL, CSV or Parquet files; find the train/validation files of a dataset path.
(Hugging Face datasets, registry names and the choice among them: sources.py.)

Every row keeps its origin ("file:line") so that a bad row can be named in the error.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from orchestrator.errors import UserError

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
_TRAIN_NAMES = ("train",)
_VALIDATION_NAMES = ("validation", "valid", "val", "dev")
_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Row:
    fields: Dict[str, Any]
    where: str  # "file:line", for error messages
    header: Optional[str] = None  # a CSV row: "file:1", where its field names come from (a missing column is there)


def read_rows(path: str) -> List[Row]:
    """All rows of a .jsonl/.json (one object per line), .csv (header row names the fields) or .parquet file."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist: check data.path / data.validation_path")
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(_EXTENSIONS)}")
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write one) is not part of the first field's name
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = _read_csv(handle, path) if suffix == ".csv" else _read_jsonl(handle, path)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8")
    if not rows:
        raise UserError(f"{path}: the file has no rows")
    return rows


def _read_jsonl(handle, path: str) -> List[Row]:
    rows = []
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            if not rows and line.strip() in ("[", "{"):  # a pretty-printed JSON document, not JSON Lines
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); this looks like one JSON document "
                                "over several lines: write one JSON object per line (JSON Lines)")
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object")
        if not isinstance(fields, dict):
            advice = ": write one JSON object per line (JSON Lines), not a JSON array" if isinstance(fields, list) \
                else ""
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(fields).__name__}{advice}")
        rows.append(Row(fields, f"{path}:{number}"))
    return rows


def _read_parquet(path: str) -> List[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's ArrowInvalid and OSError on a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({type(err).__name__}: {str(err).splitlines()[0]})")
    if not records:
        raise UserError(f"{path}: the file has no rows")
    return [Row(fields, f"{path}:row {i + 1}") for i, fields in enumerate(records)]


def _read_csv(handle, path: str) -> List[Row]:
    reader = csv.DictReader(handle)
    header = f"{path}:1"
    names = reader.fieldnames or []
    if names:  # a problem of the header is named there, not at some data line
        blank = [i + 1 for i, name in enumerate(names) if not name.strip()]
        if blank:
            raise UserError(f"{header} (the header): column {blank[0]} has no name; the first line must name "
                            f"every column (e.g. text,label), got {names}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise UserError(f"{header} (the header): column {repeated[0]!r} is named more than once; each column "
                            "needs its own name")
    rows = []
    for fields in reader:
        where = f"{path}:{reader.line_num}"
        if None in fields:  # more cells than header names
            raise UserError(f"{where}: more values than the header has columns")
        rows.append(Row(dict(fields), where, header=header))
    return rows


def resolve_dataset_files(path: str, validation_path: Optional[str]) -> Tuple[str, Optional[str]]:
    """data.path (file, directory or sample:<name>) → (train file, validation file or None)."""
    if path.startswith("sample:"):
        name = path.removeprefix("sample:")
        path = str(SAMPLES_DIR / name)
        if not os.path.isdir(path):
            available = sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir())
            raise UserError(f"data.path=sample:{name}: no such sample set; available: {', '.join(available)}")
    if os.path.isdir(path):
        train = _find(path, _TRAIN_NAMES)
        if train is None:
            raise UserError(f"data.path={path}: the directory has no train.jsonl or train.csv (nor "
                            "train.parquet), and is not a datasets.save_to_disk directory")
        return train, validation_path or _find(path, _VALIDATION_NAMES)
    if not os.path.exists(path):
        raise UserError(f"data.path={path} does not exist: give a JSONL/CSV/Parquet file, a directory, "
                        "sample:<name>, a Hugging Face dataset id or a name in datasets.yaml")
    return path, validation_path


def read_reference(path: str) -> List[Row]:
    """data.reference_path's rows of general text: a JSONL/CSV file with a "text" field, a .txt file (one row
    per paragraph, paragraphs separated by blank lines), or sample:<name> / a directory holding reference.jsonl."""
    if path.startswith("sample:"):
        path = str(SAMPLES_DIR / path.removeprefix("sample:"))
    if os.path.isdir(path):
        path = os.path.join(path, "reference.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"data.reference_path={path} does not exist: give a JSONL/CSV file with a text field, "
                        "a .txt file, or sample:general_reference")
    if Path(path).suffix.lower() != ".txt":
        return read_rows(path)
    with open(path, encoding="utf-8") as handle:
        paragraphs = [p.strip() for p in handle.read().split("\n\n")]
    rows = [Row({"text": p}, f"{path}:paragraph {i + 1}") for i, p in enumerate(paragraphs) if p]
    if not rows:
        raise UserError(f"{path}: the file has no text")
    return rows


def _find(directory: str, names: Tuple[str, ...]) -> Optional[str]:
    for name in names:
        for ext in _EXTENSIONS:
            candidate = os.path.join(directory, name + ext)
            if os.path.isfile(candidate):
                return candidate
    return None


def read_splits(path: str, validation_path: Optional[str], validation_fraction: float,
                seed: int) -> Tuple[List[Row], List[Row]]:
    """Train and validation rows; without a validation file, a seeded random share of train is held out:
    for labelled rows, that share of every label (stratified), so that the rare classes, which decide macro-F1
    and the selected model, are in validation at their rate rather than by chance."""
    train_file, validation_file = resolve_dataset_files(path, validation_path)
    train = read_rows(train_file)
    if validation_file is not None:
        return train, read_rows(validation_file)
    return hold_out(train, validation_fraction, seed, path)


def hold_out(train: List[Row], validation_fraction: float, seed: int, path: str) -> Tuple[List[Row], List[Row]]:
    """(train, validation): a seeded, per-label stratified share of the rows held out for validation."""
    rng = random.Random(seed)
    held_out = max(1, int(len(train) * validation_fraction))
    if held_out >= len(train):
        raise UserError(f"data.path={path}: {len(train)} rows are too few to hold out a validation split")
    labelled = all("label" in row.fields for row in train)
    groups: Dict[str, List[int]] = {}
    for i, row in enumerate(train):
        groups.setdefault(str(row.fields["label"]) if labelled else "", []).append(i)
    # each label's share of the held_out rows, by largest remainder (the total stays held_out)
    keys = sorted(groups)
    exact = {key: held_out * len(groups[key]) / len(train) for key in keys}
    share = {key: int(exact[key]) for key in keys}
    for key in sorted(keys, key=lambda k: (share[k] - exact[k], k))[: held_out - sum(share.values())]:
        share[key] += 1
    held: List[int] = []
    for key in keys:
        members = groups[key]
        rng.shuffle(members)
        held += members[:min(share[key], len(members) - 1)]  # every label keeps a training row
    if not held:  # every label has one row: holding any out would leave its label untrained
        raise UserError(f"data.path={path}: no row can be held out for validation: each of the {len(keys)} labels "
                        f"of its {len(train)} rows has a single row, which training needs; add rows, or give a "
                        "validation file (data.validation_path)")
    chosen = set(held)
    return [row for i, row in enumerate(train) if i not in chosen], [train[i] for i in sorted(held)]
