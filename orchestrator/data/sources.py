"""Where a dataset's rows come from. data.path (and each data.mix path) is, in this order:

1. sample:<name>: a bundled sample set (orchestrator/data/samples/);
2. an existing local path: a JSONL/CSV/Parquet file, a directory of train.* / validation.* files, or a directory
   written by `datasets.save_to_disk` (a Dataset or a DatasetDict);
3. a name in a registry file (datasets.yaml, below): its entry names the path or hub id and the format, split,
   columns that go with it (the command line's data.* keys win over the entry's);
4. a Hugging Face dataset id ("org/name"), read from the local datasets cache ($HF_DATASETS_CACHE, else
   $HF_HOME/datasets, or data.hub_cache) with the network off; it is downloaded only with data.allow_download=true.

A registry (like LLaMA-Factory's dataset_info.json) maps names to entries:

    my_clauses:                       # data.path=my_clauses
      path: data/clauses.parquet      # a file, directory, sample:<name> or hub id; relative to this file
      format: classification          # as data.format (default: auto)
      columns: {text: sentence, label: category}   # as data.columns
    alpaca:
      path: tatsu-lab/alpaca          # a hub id
      split: train                    # as data.split; also validation_split, subset, validation_path

The registries read, first match wins: data.registry, datasets.yaml next to the run file (`orchestrator train
FILE`), datasets.yaml in the working directory, and the bundled one (orchestrator/data/samples/datasets.yaml).

Workers read the same rows as the driver: the driver pins data.registry (the file that named the dataset) and
data.hub_cache (the datasets cache) as absolute paths in the run the workers get (pin_sources), and a cached
dataset is read offline, so every rank resolves the same name to the same files. On several machines those paths
must be shared (or the data shipped): a worker's node reads its own cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from orchestrator.config import DATA_FIELDS, DataConfig, DataFormat, data_columns
from orchestrator.data.readers import SAMPLES_DIR, Row, hold_out, read_rows, resolve_dataset_files
from orchestrator.errors import UserError

REGISTRY_FILE = "datasets.yaml"
BUNDLED_REGISTRY = SAMPLES_DIR / REGISTRY_FILE
ENTRY_KEYS = ("path", "format", "split", "validation_split", "validation_path", "subset", "columns", "description")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")  # taken for model selection, in this order (never test)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".arrow", ".yaml", ".yml")
_HF_ONLY = ("split", "validation_split", "subset")  # keys that only a Hugging Face dataset has a use for


@dataclass
class Source:
    kind: str  # sample | file | directory | saved (save_to_disk) | hub
    location: str  # the path, or the hub id
    cfg: DataConfig  # the data settings with a registry entry's merged in (cfg.path = location)
    name: str = ""  # the registry name, if a registry named it
    registry: Optional[str] = None  # the registry file (file:line) that named it


@dataclass
class SourceRows:
    train: List[Row]
    validation: List[Row]
    held_out: bool  # validation is a share of the training rows (data.validation_fraction)
    origin: str  # where the rows came from, for the data report


# ---------------------------------------------------------------- which source data.path names

def resolve(cfg: DataConfig, key: str = "data.path", registries: bool = True) -> Source:
    """data.path → its Source (see the module's docstring for the order). Raises UserError naming `key`."""
    path = cfg.path
    if registries and cfg.registry:
        registry_files(cfg)  # a data.registry that does not exist is an error, whether or not data.path needs it
    if path.startswith("sample:"):
        return Source("sample", path, cfg)
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return Source("saved" if is_saved_dataset(local) else "directory", local, cfg)
    if os.path.isfile(local):
        return Source("file", local, cfg)
    if registries:
        found = registry_entry(path, cfg)
        if found is not None:
            entry, where = found
            merged = merge_entry(cfg, entry, where)
            source = resolve(merged, f"{where}: {path}.path", registries=False)
            return dataclasses.replace(source, name=path, registry=where)
    if looks_like_path(path) or not _HUB_ID.fullmatch(path):
        names = registry_names(cfg) if registries else []
        known = f"; names in the registries: {', '.join(names)}" if names else ""
        raise UserError(f"{key}={path} does not exist: give a JSONL/CSV/Parquet file, a directory, sample:<name>, "
                        f"a Hugging Face dataset id (org/name) or a name in datasets.yaml{known}")
    return Source("hub", path, cfg)


def is_saved_dataset(directory: str) -> bool:
    """A directory written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return os.path.isfile(os.path.join(directory, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(directory, "state.json"))
        and os.path.isfile(os.path.join(directory, "dataset_info.json")))


def looks_like_path(path: str) -> bool:
    """A missing file rather than a hub id: absolute, ./ or ~, a Windows drive, or a data file's suffix."""
    return path.startswith(("/", ".", "~")) or "\\" in path or path.lower().endswith(_FILE_SUFFIXES)


# ---------------------------------------------------------------- registries (datasets.yaml)

def registry_files(cfg: DataConfig) -> List[Path]:
    """The registry files in lookup order (see the module's docstring), those that exist, each once."""
    from orchestrator.runfile import ACTIVE

    candidates = []
    if cfg.registry:
        explicit = Path(os.path.expanduser(cfg.registry))
        if explicit.is_dir():
            explicit = explicit / REGISTRY_FILE
        if not explicit.is_file():
            raise UserError(f"data.registry={cfg.registry} does not exist: give a {REGISTRY_FILE} file of dataset "
                            "names (orchestrator/data/samples/datasets.yaml is an example)")
        candidates.append(explicit)
    if ACTIVE.get("file"):
        candidates.append(Path(ACTIVE["file"]).parent / REGISTRY_FILE)
    candidates += [Path.cwd() / REGISTRY_FILE, BUNDLED_REGISTRY]
    files, seen = [], set()
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved.is_file() and resolved not in seen:
            seen.add(resolved)
            files.append(resolved)
    return files


def load_registry(path: Path) -> Dict[str, Tuple[Dict[str, Any], int]]:
    """name → (entry, line). An entry is a mapping of ENTRY_KEYS with a path, or a string (the path alone)."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                        f"({getattr(err, 'problem', None) or err})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a dataset registry maps names to entries ({{path, format, columns, ...}}), "
                        f"got a {type(data).__name__}")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    registry = {}
    for name, entry in data.items():
        line = lines.get(str(name), 0)
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"].strip():
            raise UserError(f"{path}:{line}: entry {name!r} needs a path: a file, a directory, sample:<name> or a "
                            "Hugging Face dataset id")
        unknown = sorted(set(map(str, entry)) - set(ENTRY_KEYS))
        if unknown:
            raise UserError(f"{path}:{line}: entry {name!r} has an unknown key {unknown[0]!r}; allowed: "
                            f"{', '.join(ENTRY_KEYS)}")
        registry[str(name)] = (entry, line)
    return registry


def registry_entry(name: str, cfg: DataConfig) -> Optional[Tuple[Dict[str, Any], str]]:
    """The first registry's entry of this name and where it is ("file:line"), or None."""
    for path in registry_files(cfg):
        registry = load_registry(path)
        if name in registry:
            entry, line = registry[name]
            entry = dict(entry)
            entry["_dir"] = str(path.parent)
            return entry, f"{path}:{line}"
    return None


def registry_names(cfg: DataConfig) -> List[str]:
    names: List[str] = []
    for path in registry_files(cfg):
        names += [n for n in load_registry(path) if n not in names]
    return names


def merge_entry(cfg: DataConfig, entry: Dict[str, Any], where: str) -> DataConfig:
    """The entry's settings where data.* leaves them at their defaults (the command line wins); a relative path
    in the entry is relative to the registry file's directory."""
    changes: Dict[str, Any] = {"path": _entry_path(entry["path"], entry["_dir"])}
    if entry.get("validation_path") and cfg.validation_path is None:
        changes["validation_path"] = _entry_path(str(entry["validation_path"]), entry["_dir"])
    if "format" in entry and cfg.format is DataFormat.auto:
        try:
            changes["format"] = DataFormat(str(entry["format"]))
        except ValueError:
            raise UserError(f"{where}: format={entry['format']!r} is not allowed: expected one of "
                            f"{', '.join(f.value for f in DataFormat)}")
    for key in _HF_ONLY:
        if entry.get(key) is not None and getattr(cfg, key) is None:
            changes[key] = str(entry[key])
    if entry.get("columns") and not data_columns(cfg.columns):
        changes["columns"] = data_columns(entry["columns"], key=f"{where}: columns")
    return dataclasses.replace(cfg, **changes)


def _entry_path(path: str, directory: str) -> str:
    if path.startswith("sample:"):
        return path
    expanded = os.path.expanduser(path)
    candidate = os.path.join(directory, expanded)
    if looks_like_path(expanded) or os.path.exists(candidate):
        return os.path.normpath(candidate)
    return path  # a hub id, or another registry's name


# ---------------------------------------------------------------- the Hugging Face datasets cache

def datasets_cache(cfg: DataConfig) -> str:
    """The Hugging Face datasets cache directory, as `datasets` finds it (without importing it)."""
    if cfg.hub_cache:
        return os.path.abspath(os.path.expanduser(cfg.hub_cache))
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["HF_DATASETS_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.abspath(os.path.join(os.path.expanduser(home), "datasets"))


def cache_root(dataset_id: str, cache: str) -> str:
    """Where `datasets` keeps a hub dataset once loaded: <cache>/<org>___<name>/<subset>/<version>/<hash>/."""
    parts = dataset_id.split("/")
    parts[-1] = _snake(parts[-1])
    return os.path.join(cache, "___".join(parts))


def _snake(name: str) -> str:
    """datasets.naming.camelcase_to_snakecase, without importing datasets."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def cached_subsets(root: str) -> List[str]:
    """The subsets (configurations) of a hub dataset that the cache holds complete (a dataset_info.json)."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if any(Path(root, d).glob(f"*/*/{'dataset_info.json'}")))


def in_cache(source: Source) -> bool:
    subsets = cached_subsets(cache_root(source.location, datasets_cache(source.cfg)))
    return bool(subsets) and (source.cfg.subset is None or source.cfg.subset in subsets)


@contextlib.contextmanager
def _quiet_datasets(offline: bool):
    """datasets without its progress bars and INFO/WARNING lines; with `offline`, its Hub calls refused (the
    cached copy is used, as HF_DATASETS_OFFLINE=1 does), whatever the environment said when it was imported."""
    import datasets
    from datasets.utils import logging as ds_logging

    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # the second: what older releases read
    saved = {flag: getattr(datasets.config, flag) for flag in flags if hasattr(datasets.config, flag)}
    verbosity, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    if offline:
        for flag in saved:
            setattr(datasets.config, flag, True)
    ds_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        for flag, value in saved.items():
            setattr(datasets.config, flag, value)
        ds_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def load_hub(source: Source, key: str) -> Tuple[Dict[str, Any], str]:
    """The splits of a hub dataset (split → datasets.Dataset) and where they were read: the local cache,
    offline; or, with data.allow_download=true and not in the cache, downloaded into it."""
    cfg, dataset_id = source.cfg, source.location
    # the name the user gave, and where it comes from
    given = f"{key}={source.name} (registry {source.registry}: {dataset_id})" if source.registry \
        else f"{key}={dataset_id}"
    cache = datasets_cache(cfg)
    root = cache_root(dataset_id, cache)
    subsets = cached_subsets(root)
    cached = in_cache(source)
    if not cached and not cfg.allow_download:
        if subsets:
            raise UserError(f"data.subset={cfg.subset}: {dataset_id} is in the local datasets cache at {root} with "
                            f"the subsets {', '.join(subsets)} only; set data.subset to one of them, or "
                            "data.allow_download=true to download this one")
        raise UserError(f"{given} is not in the local datasets cache at {root}: set "
                        "data.allow_download=true to download it from the Hugging Face Hub, or point data.path at a "
                        "file (JSONL/CSV/Parquet), a datasets.save_to_disk directory or a name in datasets.yaml")
    if cached and cfg.subset is None and len(subsets) > 1:
        raise UserError(f"{given}: the local datasets cache at {root} holds several subsets "
                        f"({', '.join(subsets)}); set data.subset to one of them")
    with _quiet_datasets(offline=cached) as datasets:
        try:
            loaded = datasets.load_dataset(dataset_id, cfg.subset, cache_dir=cache)
        except Exception as err:  # the Hub's, the network's, or a damaged cache's error
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            doing = "reading it from the local datasets cache" if cached else "downloading it"
            raise UserError(f"{given}: {doing} failed ({type(err).__name__}: {first}); cache: {root}")
    splits = dict(loaded)
    files = [f["filename"] for ds in splits.values() for f in ds.cache_files]
    where = os.path.dirname(files[0]) if files else root
    how = "from the local datasets cache" if cached else "downloaded into the datasets cache"
    subset = f", subset {cfg.subset}" if cfg.subset else ""
    return splits, f"Hugging Face dataset {dataset_id}{subset} {how} at {where}"


def load_saved(path: str, key: str) -> Dict[str, Any]:
    """A save_to_disk directory's splits; a single Dataset is the split named when it was made, else train."""
    with _quiet_datasets(offline=True) as datasets:
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as err:
            raise UserError(f"{key}={path}: not a readable datasets.save_to_disk directory ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})")
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {str(loaded.split) if loaded.split else "train": loaded}


# ---------------------------------------------------------------- reading the rows

def read_source(source: Source, seed: int, key: str = "data.path") -> SourceRows:
    """The training and validation rows of a source, data.columns applied (our field names on every row)."""
    cfg = source.cfg
    columns = data_columns(cfg.columns)
    if source.kind in ("saved", "hub"):
        rows = _read_hf(source, seed, key, columns)
    else:
        for name in _HF_ONLY:
            if getattr(cfg, name) is not None:
                raise UserError(f"data.{name}={getattr(cfg, name)} is not allowed for {key}={source.location}, "
                                f"a {'file' if source.kind == 'file' else source.kind}: data.split, "
                                "data.validation_split and data.subset apply to Hugging Face datasets (a hub id or a "
                                "datasets.save_to_disk directory)")
        train_file, validation_file = resolve_dataset_files(source.location, cfg.validation_path)
        train = rename(read_rows(train_file), columns, train_file, key)
        if validation_file is not None:
            validation, held_out = rename(read_rows(validation_file), columns, validation_file, key), False
        else:
            train, validation = hold_out(train, cfg.validation_fraction, seed, source.location)
            held_out = True
        what = f"the bundled sample set {source.location.removeprefix('sample:')}: {train_file}" \
            if source.kind == "sample" else train_file
        rows = SourceRows(train, validation, held_out, what + _validation_note(validation_file, held_out, cfg))
    if columns:
        rows.origin += "; columns " + ", ".join(f"{ours}={theirs}" for ours, theirs in columns.items())
    if source.registry:
        rows.origin = f"{source.name} (registry {source.registry}): {rows.origin}"
    return rows


def _validation_note(validation: Optional[str], held_out: bool, cfg: DataConfig) -> str:
    if held_out:
        return f", validation: {cfg.validation_fraction:g} of its rows held out (data.validation_fraction)"
    return f", validation: {validation}"


def _read_hf(source: Source, seed: int, key: str, columns: Dict[str, str]) -> SourceRows:
    cfg = source.cfg
    if source.kind == "hub":
        splits, origin = load_hub(source, key)
    else:
        splits, origin = load_saved(source.location, key), f"datasets.save_to_disk directory {source.location}"
    label = source.location
    train_split, validation_split = choose_splits(splits, cfg, label)
    train = dataset_rows(splits[train_split], f"{label}[{train_split}]", columns)
    origin += f": split {train_split}"
    if cfg.validation_path:
        validation = rename(read_rows(cfg.validation_path), columns, cfg.validation_path, key)
        return SourceRows(train, validation, False, origin + f", validation: {cfg.validation_path}")
    if validation_split is not None:
        validation = dataset_rows(splits[validation_split], f"{label}[{validation_split}]", columns)
        return SourceRows(train, validation, False, origin + f", validation: split {validation_split}")
    train, validation = hold_out(train, cfg.validation_fraction, seed, label)
    return SourceRows(train, validation, True, origin + f", validation: {cfg.validation_fraction:g} of its rows held "
                      "out (data.validation_fraction; the dataset has no validation split)")


def choose_splits(splits: Dict[str, Any], cfg: DataConfig, label: str) -> Tuple[str, Optional[str]]:
    """(the training split, the validation split or None to hold rows out). data.split defaults to train (or the
    only split); the validation split to the first of VALIDATION_SPLITS the dataset has (never its test split)."""
    names = list(splits)
    listed = ", ".join(names)
    if cfg.split is not None:
        if cfg.split not in splits:
            raise UserError(f"data.split={cfg.split} is not a split of {label}; its splits: {listed}")
        train = cfg.split
    elif "train" in splits or len(names) == 1:
        train = "train" if "train" in splits else names[0]
    else:
        raise UserError(f"data.split=null: {label} has no train split; set data.split to one of its splits: {listed}")
    if cfg.validation_split is not None:
        if cfg.validation_split not in splits:
            raise UserError(f"data.validation_split={cfg.validation_split} is not a split of {label}; its splits: "
                            f"{listed}")
        if cfg.validation_split == train:
            raise UserError(f"data.validation_split={cfg.validation_split} is the split trained on (data.split); "
                            f"give another of {listed}, or null to hold rows out")
        return train, cfg.validation_split
    return train, next((s for s in VALIDATION_SPLITS if s in splits and s != train), None)


def dataset_rows(dataset, label: str, columns: Dict[str, str]) -> List[Row]:
    """A datasets.Dataset's rows, only the columns our readers use (ours, or mapped by data.columns), class
    indices of a ClassLabel column as their names; each row named "<id>[<split>]:row N" in errors."""
    from datasets import ClassLabel

    names = list(dataset.column_names)
    _check_columns(columns, names, label)
    wanted = [c for c in names if c in DATA_FIELDS or c in columns.values()]
    if not wanted:
        raise UserError(f"{label}: none of its columns ({', '.join(names)}) is one of our fields "
                        f"({', '.join(DATA_FIELDS)}); map them with data.columns, e.g. "
                        f"data.columns='text={names[0]},label=...'")
    if len(dataset) == 0:
        raise UserError(f"{label}: the split has no rows")
    dataset = dataset.select_columns(wanted)
    class_names = {c: f.names for c, f in dataset.features.items() if isinstance(f, ClassLabel)}
    rows = []
    for i, record in enumerate(dataset.to_list()):
        for column, labels in class_names.items():
            value = record.get(column)
            if isinstance(value, int) and 0 <= value < len(labels):
                record[column] = labels[value]
        rows.append(Row(record, f"{label}:row {i + 1}"))
    return _renamed(rows, columns)


def rename(rows: List[Row], columns: Dict[str, str], where: str, key: str) -> List[Row]:
    """data.columns applied to a file's rows; a column that no row has is named with the columns it has."""
    if not columns:
        return rows
    present: List[str] = []
    for row in rows:
        present += [name for name in row.fields if name not in present]
    _check_columns(columns, present, where)
    return _renamed(rows, columns)


def _check_columns(columns: Dict[str, str], present: List[str], label: str) -> None:
    for ours, theirs in columns.items():
        if theirs not in present:
            raise UserError(f"data.columns.{ours}={theirs}: {label} has no column {theirs!r}; its columns: "
                            f"{', '.join(map(str, present))}")


def _renamed(rows: List[Row], columns: Dict[str, str]) -> List[Row]:
    if not columns:
        return rows
    for row in rows:
        original = row.fields
        row.fields = dict(original)
        for ours, theirs in columns.items():
            row.fields[ours] = original.get(theirs)
    return rows


# ---------------------------------------------------------------- the driver

def quote_columns_override(arg: str) -> str:
    """`data.columns=text=sentence,label=category` as typed on the command line → the same value quoted, which is
    how Hydra's override grammar takes it (unquoted, '=' is a syntax error and ',' a sweep); a mapping
    ({text: sentence}), null or a value quoted already is left as it is."""
    match = re.fullmatch(r"(\+{0,2}data\.columns)=(.*)", arg, re.S)
    if not match or not match.group(2) or match.group(2)[0] in "'\"{[" or not re.search(r"[=,]", match.group(2)):
        return arg
    from orchestrator.runfile import quote

    return f"{match.group(1)}={quote(match.group(2))}"



def describe(cfg: DataConfig, key: str = "data.path") -> str:
    """What data.path names, in words (no rows read)."""
    source = resolve(cfg, key)
    kinds = {"sample": "bundled sample set", "file": "file", "directory": "directory", "saved":
             "datasets.save_to_disk directory", "hub": "Hugging Face dataset id"}
    text = f"{kinds[source.kind]} {source.location}"
    return f"{source.name} (registry {source.registry}): {text}" if source.registry else text


def pin_sources(cfg: DataConfig) -> None:
    """On the driver, before the run goes to the workers: every dataset name resolved (an unknown one fails here,
    before anything starts); data.registry set to the registry file that named data.path (the workers run in
    another directory, without the run file) and data.hub_cache to the datasets cache, both absolute, so that
    each rank reads the same rows."""
    paths = [("data.path", cfg.path)] if not cfg.mix else [(f"data.mix[{i}].path", e.path)
                                                           for i, e in enumerate(cfg.mix)]
    registry, hub = None, False
    for key, path in paths:
        source = resolve(dataclasses.replace(cfg, path=path, mix=None), key)
        if source.registry and registry is None and not source.registry.startswith(f"{BUNDLED_REGISTRY}:"):
            registry = source.registry.rsplit(":", 1)[0]
        hub = hub or source.kind == "hub"
    if cfg.registry:
        cfg.registry = str(Path(os.path.expanduser(cfg.registry)).resolve())
    elif registry:
        cfg.registry = registry
    if hub:
        cfg.hub_cache = datasets_cache(cfg)


def on_this_machine(cfg: DataConfig) -> bool:
    """Whether data.path (and data.validation_path) can be read here: a local path, a sample, a registry name whose
    data is here, or a hub id in the local cache (else launcher=rayjob's job reads it in the cluster)."""
    entries = [(cfg.path, cfg.validation_path)] if not cfg.mix else [(e.path, e.validation_path) for e in cfg.mix]
    for path, validation_path in entries:
        if validation_path is not None and not os.path.exists(validation_path):
            return False
        try:
            source = resolve(dataclasses.replace(cfg, path=path, mix=None))
        except UserError:
            return False
        if source.kind == "hub" and not in_cache(source):
            return False
    return True
