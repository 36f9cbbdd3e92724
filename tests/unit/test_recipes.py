"""Recipes for popular models (hydra_conf/experiment/<family>_<size>_<strategy>.yaml) and the planner's shape table
(orchestrator/model_configs/*/config.json) that plans them without weights (issue 17).

- every shape builds with transformers on the meta device into a model of its published size, and the planner's
  own parameter arithmetic (memory.ModelShape) agrees with the built model: a typo in a shape fails here;
- every hub id a shape names resolves to it (any case), ids are unique; an unknown id in a dry run says how to
  plan it (one line, exit 2), and model.allow_download then fetches config.json alone;
- every recipe composes with any data (a tiny JSONL file here) and plans, without Ray, on 1 x 24 GB, 1 x 80 GB and
  8 x 80 GB: the strategy it names where it is sized to fit, else the planner's one-line refusal saying what to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import Strategy
from orchestrator.errors import UserError
from orchestrator.model import BUILTIN_CONFIGS, known_shape, read_model_config
from tests.conftest import ROOT, compose_run

# shape -> published parameter count (model cards; embeddings included)
PUBLISHED = {
    "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9,
    "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.61e9,
    "qwen2.5-14b": 14.7e9, "qwen2.5-32b": 32.5e9, "qwen2.5-72b": 72.7e9,
    "qwen3-0.6b": 0.6e9, "qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9, "qwen3-32b": 32.8e9,
    "mistral-7b-v0.3": 7.25e9, "gemma-2-2b": 2.61e9, "gemma-2-9b": 9.24e9, "gemma-3-1b": 1.0e9,
    "phi-3-mini-4k": 3.82e9, "phi-4": 14.7e9,
    "tiny-llama": 4.0e6,
}
SHAPES = sorted(p.parent.name for p in BUILTIN_CONFIGS.glob("*/config.json"))

# recipe -> (the strategy it names, the clusters (GPUs, GiB each) it is sized for: it must plan there)
ONE_24, ONE_80, EIGHT_80 = (1, 24), (1, 80), (8, 80)
RECIPES = {
    "llama3_1b_full": (Strategy.full, [ONE_80, EIGHT_80]),
    "llama3_8b_full": (Strategy.full, [EIGHT_80]),
    "llama3_8b_lora": (Strategy.lora, [ONE_80, EIGHT_80]),
    "llama3_8b_qlora": (Strategy.qlora, [ONE_24, ONE_80]),
    "llama3_70b_lora": (Strategy.lora, [EIGHT_80]),
    "llama3_70b_qlora": (Strategy.qlora, [ONE_80]),
    "qwen2_5_0_5b_full": (Strategy.full, [ONE_24, ONE_80, EIGHT_80]),
    "qwen2_5_7b_full": (Strategy.full, [EIGHT_80]),
    "qwen2_5_7b_lora": (Strategy.lora, [ONE_80, EIGHT_80]),
    "qwen2_5_14b_lora": (Strategy.lora, [ONE_80, EIGHT_80]),
    "qwen2_5_32b_qlora": (Strategy.qlora, [ONE_80]),
    "qwen2_5_72b_qlora": (Strategy.qlora, [ONE_80]),
    "qwen3_8b_full": (Strategy.full, [EIGHT_80]),
    "qwen3_8b_lora": (Strategy.lora, [ONE_80, EIGHT_80]),
    "qwen3_32b_qlora": (Strategy.qlora, [ONE_80]),
    "mistral_7b_full": (Strategy.full, [EIGHT_80]),
    "mistral_7b_lora": (Strategy.lora, [ONE_24, ONE_80, EIGHT_80]),
    "mistral_7b_qlora": (Strategy.qlora, [ONE_24, ONE_80]),
    "gemma2_2b_full": (Strategy.full, [ONE_80, EIGHT_80]),
    "gemma2_9b_lora": (Strategy.lora, [ONE_80, EIGHT_80]),
    "phi3_mini_lora": (Strategy.lora, [ONE_24, ONE_80, EIGHT_80]),
    "phi4_lora": (Strategy.lora, [ONE_80, EIGHT_80]),
    "phi4_qlora": (Strategy.qlora, [ONE_24, ONE_80]),
}
# QLoRA on 32B and up: the QLoRA authors' 1e-4 for 33B/65B (artidoro/qlora scripts), set in the file; every other
# recipe trains at its strategy's default rate (orchestrator/hyperparameters.py)
SET_LR = {"llama3_70b_qlora": 1e-4, "qwen2_5_72b_qlora": 1e-4, "qwen2_5_32b_qlora": 1e-4, "qwen3_32b_qlora": 1e-4}
NOT_RECIPES = {"legal_demo", "legal_full"}  # the legal examples (tests/unit/test_config.py)


def test_every_shape_and_recipe_is_listed_here():
    assert set(SHAPES) == set(PUBLISHED)
    experiments = {p.stem for p in (ROOT / "hydra_conf" / "experiment").glob("*.yaml")}
    assert experiments - NOT_RECIPES == set(RECIPES)


@pytest.fixture(scope="module")
def built():
    """shape -> (parameters of the model transformers builds from it on the meta device, the planner's count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.memory import ModelShape

    counts = {}
    for name in SHAPES:
        directory = BUILTIN_CONFIGS / name
        config = AutoConfig.from_pretrained(directory)  # as build_model reads it
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        shape = json.loads((directory / "config.json").read_text())
        counts[name] = (sum(p.numel() for p in model.parameters()), ModelShape.from_config(shape).params)
    return counts


@pytest.mark.parametrize("name", SHAPES)
def test_a_shape_builds_a_model_of_its_published_size(name, built):
    parameters, planned = built[name]
    assert parameters == pytest.approx(PUBLISHED[name], rel=0.03), f"{name}: {parameters / 1e9:.3f}B"
    assert planned == pytest.approx(parameters, rel=0.001), "memory.ModelShape counts another model"


def test_every_hub_id_resolves_to_its_shape_in_any_case():
    seen = {}
    for name in SHAPES:
        ids = json.loads((BUILTIN_CONFIGS / name / "config.json").read_text()).get("_hub_id", [])
        for hub_id in [ids] if isinstance(ids, str) else ids:
            assert hub_id.lower() not in seen, f"{hub_id} in {name} and {seen[hub_id.lower()]}"
            seen[hub_id.lower()] = name
            assert Path(known_shape(hub_id)).name == name
            assert Path(known_shape(hub_id.upper())).name == name
    assert {"meta-llama/llama-3.1-8b", "qwen/qwen2.5-0.5b", "qwen/qwen3-8b", "google/gemma-2-9b-it"} <= set(seen)
    assert known_shape("Qwen/Qwen2.5-0.5B-Instruct-AWQ") is None  # exact ids only


def test_a_dry_run_for_an_unknown_hub_id_says_how_to_plan_it(tmp_path):
    run = compose_run(["+experiment=llama3_8b_lora", "model.path=someone/unknown-model-7b", "dry_run=true"], tmp_path)
    with pytest.raises(UserError) as err:
        read_model_config(run.model, shape_only=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.path=someone/unknown-model-7b: a dry run plans")
    assert "local directory holding its config.json" in message and "model.allow_download=true" in message
    with pytest.raises(UserError, match="neither a local directory nor in the Hugging Face cache"):
        read_model_config(run.model, shape_only=False)  # a run needs the weights: the message about them


def test_a_dry_run_with_allow_download_fetches_config_json_alone(tmp_path, monkeypatch):
    import huggingface_hub

    fetched = []

    def hf_hub_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        (tmp_path / "config.json").write_text((BUILTIN_CONFIGS / "qwen3-8b" / "config.json").read_text())
        return str(tmp_path / "config.json")

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if not local_files_only:
            raise AssertionError("a dry run downloaded the whole model")
        raise FileNotFoundError(repo_id)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    run = compose_run(["+experiment=qwen3_8b_lora", "model.path=someone/qwen3-finetune", "model.allow_download=true",
                       "dry_run=true"], tmp_path)
    assert read_model_config(run.model, shape_only=True)["num_hidden_layers"] == 36
    assert fetched == [("someone/qwen3-finetune", "config.json")]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"Summarise clause {i}.", "input": "", "output": f"Clause {i} is fine."} for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_composes_with_any_data_and_plans_its_strategy(recipe, tiny_data, tmp_path, monkeypatch):
    import launch.local
    from orchestrator.__main__ import local_resources
    from orchestrator.preflight import DataCheck, preflight

    monkeypatch.setattr(launch.local, "start_ray", lambda cluster: pytest.fail("a dry run started Ray"))
    strategy, sized_for = RECIPES[recipe]
    for gpus, memory in (ONE_24, ONE_80, EIGHT_80):
        run = compose_run([f"+experiment={recipe}", f"data.path={tiny_data}", "dry_run=true", f"cluster.gpus={gpus}",
                           f"cluster.gpu_memory_gb={memory}"], tmp_path)
        assert run.name == recipe and run.strategy is strategy and run.data.path == str(tiny_data)
        try:  # the CLI's dry run: resources as cluster.* say, no Ray
            plan = preflight(run, lambda: local_resources(run), runs_here=False, data=DataCheck.read, check_freeze=True,
                             report=False, shape_only=True).plan
        except UserError as err:
            message = str(err)
            assert (gpus, memory) not in sized_for, f"{recipe} on {gpus} x {memory} GB: {message}"
            assert "\n" not in message and message.startswith(f"strategy={strategy.value} ")
            if strategy is Strategy.qlora and gpus > 1:
                assert "runs on one GPU" in message and "cluster.gpus=1" in message
            else:  # how much it needs, and what to change
                assert "does not fit: predicted" in message and "use more GPUs" in message
            continue
        assert plan.strategy is strategy, f"{recipe} on {gpus} x {memory} GB"
        assert plan.predicted_gib_per_gpu <= 0.9 * memory
        lr = plan.hyperparameters["optim.lr"]
        assert (lr["value"], lr["source"] == "set") == ((SET_LR[recipe], True) if recipe in SET_LR
                                                        else (lr["value"], False))


def test_the_cli_refuses_an_unknown_hub_id_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "orchestrator", "+experiment=llama3_8b_full",
                             "model.path=someone/unknown-model", "dry_run=true", "cluster.gpus=8",
                             "cluster.gpu_memory_gb=80", f"hydra.run.dir={tmp_path}/run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model.allow_download=true" in result.stderr
