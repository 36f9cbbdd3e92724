"""Issue 17, datasets by name, through the real CLI: a dataset in the Hugging Face datasets cache layout (as a hub
download leaves it; nothing is downloaded) trains by its hub id, and by a registry name from the working
directory's datasets.yaml, whose entry gives that id and the column mapping. Two CPU workers read the rows
themselves, in Ray's working directory, without the registry the driver found: the driver hands them its absolute
path and the cache's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_data_sources import hub_cache_dataset

pytestmark = pytest.mark.ray

CONSOLE_SCRIPT = Path(sys.executable).parent / "orchestrator"


def rows(n: int, offset: int = 0) -> dict:
    return {"sentence": [f"we may close your account {offset + i} at any time" if i % 2 else
                         f"write to help{offset + i}@example.com with questions" for i in range(n)],
            "category": [i % 2 for i in range(n)]}


@pytest.mark.parametrize("by", ["registry name", "hub id"])
def test_a_cached_hub_dataset_trains_by_its_id_or_a_registry_name(by, tmp_path):
    cache = tmp_path / "hf_datasets"
    hub_cache_dataset(cache, "acme/TinyClauses", {"train": rows(32), "validation": rows(8, 100)})
    home = tmp_path / "project"
    home.mkdir()
    (home / "datasets.yaml").write_text("clauses:\n  path: acme/TinyClauses\n  format: classification\n"
                                        "  columns: {text: sentence, label: category}\n")
    run_dir = home / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
    named = (["data.path=clauses"] if by == "registry name" else  # the entry gives the id and the columns
             ["data.path=acme/TinyClauses", "data.format=classification", "data.columns=text=sentence,label=category"])
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), *named, "trainer.max_steps=2", "trainer.micro_batch_size=4",
         "data.max_length=32", "cluster.cpu_workers=2", "logger.mode=disabled", "trainer.select_best=false",
         f"hydra.run.dir={run_dir}"], cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    source = f"Hugging Face dataset acme/TinyClauses from the local datasets cache at {cache / 'acme___tiny_clauses'}"
    if by == "registry name":
        assert f"data from: clauses (registry {home / 'datasets.yaml'}:1): {source}" in result.stdout
    else:
        assert f"data from: {source}" in result.stdout, result.stdout
    assert "data: classification, 32 train rows, 8 validation rows" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["train/loss_history"]) == 2
    exported = json.loads((run_dir / "export" / "config.json").read_text())
    assert exported["id2label"] == {"0": "negative", "1": "positive"}  # the ClassLabel names, on the workers too
