"""Datasets by name (issue 17): data.path as a datasets.save_to_disk directory, a Hugging Face dataset id in the
local datasets cache, or a registry name (datasets.yaml); data.split, data.validation_split, data.columns; and one
error line for each bad input. Nothing is downloaded: the hub-cache layout is built here, as `datasets` writes it
when it downloads a dataset (hub_cache_dataset), and read with the network off."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.config import DataConfig, DataFormat, Task, data_columns
from orchestrator.data import origin_note, read_data
from orchestrator.data.sources import pin_sources, resolve
from orchestrator.errors import UserError

LABELS = ["negative", "positive"]


def clause_rows(n: int, offset: int = 0) -> dict:
    """Columns named as a hub dataset would (sentence, category as a ClassLabel index), not as ours."""
    return {"sentence": [f"clause number {offset + i} of the terms" for i in range(n)],
            "category": [i % 2 for i in range(n)]}


def features():
    from datasets import ClassLabel, Features, Value

    return Features({"sentence": Value("string"), "category": ClassLabel(names=LABELS)})


def hub_cache_dataset(cache: Path, repo_id: str, splits: dict, subset: str = "default") -> Path:
    """A hub dataset as `datasets` leaves it in its cache after load_dataset(repo_id) downloaded it:
    <cache>/<org>___<name>/<subset>/<version>/<hash>/{dataset_info.json, <name>-<split>.arrow}. Built by the same
    packaged JSON builder a hub download of JSON files runs, given the repo id (the builder only refuses local
    data files for a repo id, so it is set after construction); the test then reads it offline by its id."""
    from datasets.packaged_modules.json.json import Json

    source = cache.parent / f"src-{repo_id.replace('/', '-')}-{subset}"
    source.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, columns in splits.items():
        path = source / f"{split}.jsonl"
        names = list(columns)
        path.write_text("".join(json.dumps(dict(zip(names, values))) + "\n" for values in zip(*columns.values())))
        files[split] = str(path)
    builder = Json(cache_dir=str(cache), dataset_name=repo_id.split("/")[-1], config_name=subset, config_id=subset,
                   data_files=files, hash="0123abcd", features=features())
    builder.repo_id = repo_id
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return Path(builder.cache_dir)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture()
def saved_dict(tmp_path) -> Path:
    from datasets import Dataset, DatasetDict

    path = tmp_path / "saved_dict"
    DatasetDict({"train": Dataset.from_dict(clause_rows(12), features=features()),
                 "validation": Dataset.from_dict(clause_rows(4, 100), features=features()),
                 "test": Dataset.from_dict(clause_rows(4, 200), features=features())}).save_to_disk(str(path))
    return path


COLUMNS = {"text": "sentence", "label": "category"}


# ---------------------------------------------------------------- save_to_disk directories

def test_a_saved_dataset_dict_reads_its_train_and_validation_splits_with_columns_mapped(saved_dict):
    raw = read_data(DataConfig(path=str(saved_dict), columns=COLUMNS), Task.classification, 1)
    assert raw.format is DataFormat.classification and raw.labels == LABELS  # ClassLabel indices → names
    assert len(raw.train) == 12 and len(raw.validation) == 4
    assert raw.train[0].fields["text"] == "clause number 0 of the terms" and raw.train[1].fields["label"] == "positive"
    assert raw.validation[0].fields["text"] == "clause number 100 of the terms"  # the validation split, not test
    assert raw.train[3].where == f"{saved_dict}[train]:row 4"
    note = origin_note(raw)
    assert note.startswith(f"data from: datasets.save_to_disk directory {saved_dict}: split train, validation: "
                           "split validation; columns text=sentence, label=category"), note


def test_split_and_validation_split_choose_other_splits(saved_dict):
    raw = read_data(DataConfig(path=str(saved_dict), columns=COLUMNS, split="validation", validation_split="test"),
                    Task.classification, 1)
    assert [r.fields["text"] for r in raw.train][:1] == ["clause number 100 of the terms"]
    assert raw.validation[0].fields["text"] == "clause number 200 of the terms"


def test_a_single_saved_dataset_without_validation_holds_rows_out(tmp_path):
    from datasets import Dataset

    path = tmp_path / "single"
    Dataset.from_dict({"text": [f"row {i}" for i in range(20)], "label": ["a", "b"] * 10}).save_to_disk(str(path))
    raw = read_data(DataConfig(path=str(path), validation_fraction=0.25), Task.classification, 1)
    assert len(raw.train) == 15 and len(raw.validation) == 5  # stratified, as for a file without validation
    assert "0.25 of its rows held out" in raw.origin


def test_the_same_rows_every_time(saved_dict):
    """Every rank reads the rows itself: the same config gives the same rows in the same order."""
    cfg = DataConfig(path=str(saved_dict), columns="text=sentence,label=category", split="test")
    first, second = (read_data(cfg, Task.classification, 7) for _ in range(2))
    assert [r.fields for r in first.train] == [r.fields for r in second.train]
    assert [r.fields for r in first.validation] == [r.fields for r in second.validation]


# ---------------------------------------------------------------- hub ids in the local cache

def test_a_hub_id_in_the_local_cache_is_read_offline(hub_cache):
    where = hub_cache_dataset(hub_cache, "acme/TinyClauses", {"train": clause_rows(10), "validation":
                                                              clause_rows(4, 50)})
    assert where == hub_cache / "acme___tiny_clauses" / "default" / "0.0.0" / "0123abcd"
    cfg = DataConfig(path="acme/TinyClauses", columns=COLUMNS)
    assert resolve(cfg).kind == "hub"
    raw = read_data(cfg, Task.classification, 1)
    assert len(raw.train) == 10 and len(raw.validation) == 4 and raw.labels == LABELS
    assert raw.validation[0].fields["text"] == "clause number 50 of the terms"
    assert origin_note(raw).startswith(f"data from: Hugging Face dataset acme/TinyClauses from the local datasets "
                                       f"cache at {where}: split train, validation: split validation"), raw.origin
    assert raw.name == "TinyClauses"


def test_a_subset_of_a_cached_hub_dataset(hub_cache):
    hub_cache_dataset(hub_cache, "acme/clauses", {"train": clause_rows(6)}, subset="small")
    hub_cache_dataset(hub_cache, "acme/clauses", {"train": clause_rows(8)}, subset="large")
    with pytest.raises(UserError, match=r"^data.path=acme/clauses: the local datasets cache at \S+acme___clauses "
                                        r"holds several subsets \(large, small\); set data.subset to one of them$"):
        read_data(DataConfig(path="acme/clauses", columns=COLUMNS), Task.classification, 1)
    raw = read_data(DataConfig(path="acme/clauses", subset="large", columns=COLUMNS, validation_fraction=0.25),
                    Task.classification, 1)
    assert len(raw.train) + len(raw.validation) == 8 and ", subset large " in raw.origin
    with pytest.raises(UserError, match=r"^data.subset=medium: acme/clauses is in the local datasets cache at \S+ "
                                        r"with the subsets large, small only"):
        read_data(DataConfig(path="acme/clauses", subset="medium", columns=COLUMNS), Task.classification, 1)


def test_an_uncached_hub_id_says_where_it_looked_and_what_to_do(hub_cache):
    with pytest.raises(UserError) as err:
        read_data(DataConfig(path="tatsu-lab/alpaca"), Task.causal_lm, 1)
    assert str(err.value) == (
        f"data.path=tatsu-lab/alpaca is not in the local datasets cache at {hub_cache}/tatsu-lab___alpaca: set "
        "data.allow_download=true to download it from the Hugging Face Hub, or point data.path at a file "
        "(JSONL/CSV/Parquet), a datasets.save_to_disk directory or a name in datasets.yaml")


def test_allow_download_asks_datasets_for_it_online(hub_cache, monkeypatch):
    """With data.allow_download=true an uncached id goes to datasets.load_dataset with the network allowed (its
    failure here, with no network, is one line); a cached one is read offline all the same."""
    import datasets

    calls = []

    def fake_load(dataset_id, subset=None, cache_dir=None):
        calls.append((dataset_id, subset, cache_dir, datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'acme/new' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=r"^data.path=acme/new: downloading it failed \(ConnectionError: Couldn't reach "
                                        r"'acme/new' on the Hub \(LocalEntryNotFoundError\)\); cache: \S+acme___new$"):
        read_data(DataConfig(path="acme/new", allow_download=True), Task.causal_lm, 1)
    assert calls == [("acme/new", None, str(hub_cache), False)]


# ---------------------------------------------------------------- registries

def write_registry(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_registry_name_in_the_working_directory(tmp_path, monkeypatch, hub_cache):
    hub_cache_dataset(hub_cache, "acme/TinyClauses", {"train": clause_rows(10), "validation": clause_rows(4, 50)})
    monkeypatch.chdir(tmp_path)
    registry = write_registry(tmp_path / "datasets.yaml", "# mine\ntiny:\n  path: acme/TinyClauses\n"
                              "  format: classification\n  columns: {text: sentence, label: category}\n")
    raw = read_data(DataConfig(path="tiny"), Task.classification, 1)
    assert len(raw.train) == 10 and raw.name == "tiny" and raw.source == "registry"
    assert origin_note(raw).startswith(f"data from: tiny (registry {registry}:2): Hugging Face dataset "
                                       "acme/TinyClauses from the local datasets cache at ")
    # the command line wins over the entry
    raw = read_data(DataConfig(path="tiny", validation_split="train", split="validation"), Task.classification, 1)
    assert len(raw.train) == 4 and len(raw.validation) == 10


def test_registry_paths_are_relative_to_the_registry_and_the_bundled_names_work(tmp_path, monkeypatch):
    data = tmp_path / "mine" / "data"
    data.mkdir(parents=True)
    (data / "clauses.jsonl").write_text("".join(json.dumps({"sentence": f"s {i}", "category": "ab"[i % 2]}) + "\n"
                                                for i in range(10)))
    registry = write_registry(tmp_path / "mine" / "reg.yaml", "clauses:\n  path: data/clauses.jsonl\n"
                              "  columns: text=sentence,label=category\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: the entry's path is the registry's
    raw = read_data(DataConfig(path="clauses", registry=str(registry), validation_fraction=0.2), Task.classification,
                    1)
    assert raw.train[0].fields["text"].startswith("s ") and raw.labels == ["a", "b"]
    assert raw.origin.startswith(f"clauses (registry {registry}:1): {data / 'clauses.jsonl'}, validation: 0.2 of")
    bundled = read_data(DataConfig(path="legal_instructions"), Task.causal_lm, 1)
    assert bundled.format is DataFormat.alpaca and len(bundled.train) > 100
    assert "orchestrator/data/samples/datasets.yaml" in bundled.origin


def test_the_registry_next_to_the_run_file_is_read(tmp_path, monkeypatch):
    from orchestrator import runfile

    project = tmp_path / "project"
    write_registry(project / "datasets.yaml", "clauses: sample:legal_clauses\n")
    monkeypatch.setitem(runfile.ACTIVE, "file", str(project / "run.yaml"))
    monkeypatch.chdir(tmp_path)
    assert resolve(DataConfig(path="clauses")).registry == f"{project / 'datasets.yaml'}:1"


def test_pin_sources_gives_the_workers_the_registry_and_the_cache(tmp_path, monkeypatch, hub_cache):
    """The workers run elsewhere, without the run file: the driver hands them the absolute registry and cache."""
    hub_cache_dataset(hub_cache, "acme/TinyClauses", {"train": clause_rows(10)})
    monkeypatch.chdir(tmp_path)
    registry = write_registry(tmp_path / "datasets.yaml", "tiny: {path: acme/TinyClauses, columns: "
                              "{text: sentence, label: category}}\n")
    cfg = DataConfig(path="tiny")
    pin_sources(cfg)
    assert cfg.registry == str(registry) and cfg.hub_cache == str(hub_cache)
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.delenv("HF_DATASETS_CACHE")
    assert len(read_data(cfg, Task.classification, 1).train) + 1 == 10  # 1 held out
    bundled = DataConfig(path="legal_clauses")
    pin_sources(bundled)  # the bundled registry is found anywhere: nothing to pin
    assert bundled.registry is None and bundled.hub_cache is None


def test_a_sweep_trial_gets_the_registry_of_the_sweeps_run_file(tmp_path, monkeypatch):
    """A trial is a child process without the run file (`orchestrator train FILE -m`): its command pins the
    datasets.yaml beside that file, which it would not find on its own; a bundled name needs nothing."""
    from types import SimpleNamespace

    from launch.sweep import pinned_data
    from orchestrator import runfile

    project = tmp_path / "project"
    write_registry(project / "datasets.yaml", "clauses: sample:legal_clauses\n")
    monkeypatch.setitem(runfile.ACTIVE, "file", str(project / "run.yaml"))
    monkeypatch.chdir(tmp_path)
    run = SimpleNamespace(data=DataConfig(path="clauses"))
    assert pinned_data(run) == {"data.registry": str(project / "datasets.yaml")}
    assert run.data.registry is None  # the trial's own config is left as composed
    assert pinned_data(SimpleNamespace(data=DataConfig(path="legal_clauses"))) == {}
    monkeypatch.setitem(runfile.ACTIVE, "file", None)  # what the trial's child process saw before: not a registry
    assert "data.registry" not in pinned_data(run)  # name (a bare name is then taken for a hub id)


# ---------------------------------------------------------------- columns on files, and the errors

def test_columns_map_a_csv_files_header(tmp_path):
    path = tmp_path / "clauses.csv"
    path.write_text("sentence,category\n" + "".join(f"clause {i},{'ab'[i % 2]}\n" for i in range(10)))
    raw = read_data(DataConfig(path=str(path), columns={"text": "sentence", "label": "category"}),
                    Task.classification, 1)
    assert raw.format is DataFormat.classification and raw.labels == ["a", "b"]


def test_a_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"instruction": [f"do {i}" for i in range(10)], "output": ["done"] * 10}), path)
    raw = read_data(DataConfig(path=str(path)), Task.causal_lm, 1)
    assert raw.format is DataFormat.alpaca and len(raw.train) == 9 and raw.train[0].where.startswith(f"{path}:row ")


@pytest.mark.parametrize("value,expected", [
    ("text=sentence,label=category", COLUMNS), ("text:sentence", {"text": "sentence"}), (COLUMNS, COLUMNS),
    (None, {}), ("", {})])
def test_columns_as_a_mapping_or_a_string(value, expected):
    assert data_columns(value) == expected


@pytest.mark.parametrize("value,message", [
    ("txt=sentence", "data.columns.txt='sentence' is not allowed: a column for one of our fields: text, label, "
                     "instruction, input, output, messages, conversations"),
    ("text", "data.columns='text' is not allowed: a mapping of our fields"),
    ({"text": 3}, "data.columns={'text': 3} is not allowed: a mapping of our fields")])
def test_bad_columns_values(value, message):
    with pytest.raises(UserError) as err:
        data_columns(value)
    assert str(err.value).startswith(message), err.value


def test_errors_name_the_key_and_list_what_there_is(saved_dict, tmp_path, hub_cache, monkeypatch):
    hub_cache_dataset(hub_cache, "acme/TinyClauses", {"train": clause_rows(10), "validation": clause_rows(4, 50)})
    cases = [
        (DataConfig(path=str(saved_dict), columns={"text": "sentense", "label": "category"}),
         f"data.columns.text=sentense: {saved_dict}[train] has no column 'sentense'; its columns: sentence, category"),
        (DataConfig(path="acme/TinyClauses", columns={"text": "sentence", "label": "klass"}),
         "data.columns.label=klass: acme/TinyClauses[train] has no column 'klass'; its columns: sentence, category"),
        (DataConfig(path=str(saved_dict), columns=COLUMNS, split="tran"),
         f"data.split=tran is not a split of {saved_dict}; its splits: train, validation, test"),
        (DataConfig(path="acme/TinyClauses", columns=COLUMNS, validation_split="dev"),
         "data.validation_split=dev is not a split of acme/TinyClauses; its splits: train, validation"),
        (DataConfig(path=str(saved_dict)),
         f"{saved_dict}[train]: none of its columns (sentence, category) is one of our fields (text, label, "
         "instruction, input, output, messages, conversations); map them with data.columns, e.g. "
         "data.columns='text=sentence,label=...'"),
        (DataConfig(path="sample:legal_clauses", split="test"),
         "data.split=test is not allowed for data.path=sample:legal_clauses, a sample: data.split, "
         "data.validation_split and data.subset apply to Hugging Face datasets"),
        (DataConfig(path="./no/such.jsonl"), "data.path=./no/such.jsonl does not exist: give a JSONL/CSV/Parquet "
         "file, a directory, sample:<name>, a Hugging Face dataset id (org/name) or a name in datasets.yaml; names "
         "in the registries: legal_clauses, legal_instructions"),
        (DataConfig(path="sample:legal_clauses", registry=str(tmp_path / "nope.yaml")),
         f"data.registry={tmp_path / 'nope.yaml'} does not exist: give a datasets.yaml file"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError) as err:
            read_data(cfg, Task.classification, 1)
        assert str(err.value).startswith(message), (message, str(err.value))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("tiny:\n  format: alpaca\n", ":1: entry 'tiny' needs a path: a file, a directory, sample:<name> or a Hugging "
     "Face dataset id"),
    ("a: sample:legal_clauses\ntiny:\n  path: x/y\n  colums: {text: a}\n", ":2: entry 'tiny' has an unknown key "
     "'colums'; allowed: path, format, split, validation_split, validation_path, subset, columns, description"),
    ("tiny:\n  path: sample:legal_clauses\n  format: csv\n", ":1: format='csv' is not allowed: expected one of auto, "
     "classification, alpaca, chat, text"),
    ("tiny:\n  path: sample:legal_clauses\n  columns: {txt: a}\n", ":1: columns.txt='a' is not allowed: a column "
     "for one of our fields"),
    ("- tiny\n", ": a dataset registry maps names to entries"),
    ("tiny: [\n", ":2: not valid YAML"),
])
def test_bad_registry_entries(tmp_path, text, message):
    registry = write_registry(tmp_path / "datasets.yaml", text)
    with pytest.raises(UserError) as err:
        read_data(DataConfig(path="tiny", registry=str(registry)), Task.causal_lm, 1)
    assert str(err.value).startswith(f"{registry}{message}"), err.value


def test_bundled_registry_is_valid_and_names_the_samples():
    from orchestrator.data.sources import BUNDLED_REGISTRY, load_registry

    entries = load_registry(BUNDLED_REGISTRY)
    assert {"legal_clauses", "legal_instructions"} <= set(entries)
    for name, (entry, _) in entries.items():
        assert DataFormat(entry.get("format", "auto")) and data_columns(entry.get("columns")) is not None
        assert os.path.isabs(entry["path"]) is False


def test_the_command_lines_columns_string_reaches_hydra_quoted():
    """`data.columns=text=sentence,label=category` as typed: Hydra's grammar refuses '=' in a value and takes ','
    for a sweep, so the CLI quotes it; mappings and quoted values pass as they are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from orchestrator.cli import route
    from orchestrator.data.sources import quote_columns_override

    args = route(["data.columns=text=sentence,label=category", "data.path=x", "trainer.max_steps=1"])
    assert args == ["data.columns='text=sentence,label=category'", "data.path=x", "trainer.max_steps=1"]
    parsed = OverridesParser.create().parse_override(args[0])
    assert parsed.value() == "text=sentence,label=category" and not parsed.is_sweep_override()
    for kept in ("data.columns={text:sentence}", "data.columns=null", "data.columns='a=b'", "data.columns=text:s"):
        assert quote_columns_override(kept) == kept


def test_a_mix_of_a_registry_name_and_a_hub_id(tmp_path, monkeypatch, hub_cache, saved_dict):
    from orchestrator.config import MixEntry
    from orchestrator.data.sources import on_this_machine

    hub_cache_dataset(hub_cache, "acme/TinyClauses", {"train": clause_rows(10), "validation": clause_rows(4, 50)})
    monkeypatch.chdir(tmp_path)
    write_registry(tmp_path / "datasets.yaml", f"saved: {saved_dict}\n")
    cfg = DataConfig(mix=[MixEntry(path="saved"), MixEntry(path="acme/TinyClauses", weight=2.0)], columns=COLUMNS)
    raw = read_data(cfg, Task.classification, 1)
    assert [p.name for p in raw.parts] == ["saved", "TinyClauses"] and len(raw.train) == 22
    assert origin_note(raw).startswith("data from:\n  saved: saved (registry ")
    assert on_this_machine(cfg)
    assert not on_this_machine(DataConfig(path="acme/elsewhere")) and not on_this_machine(DataConfig(path="nope"))
