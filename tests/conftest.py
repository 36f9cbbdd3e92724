"""Shared fixtures: composing configs without the CLI, one Ray cluster for the whole session, tiny models."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("ORCHESTRATOR_CACHE_DIR", tempfile.mkdtemp(prefix="orchestrator-cache-"))  # not ~/.cache


@pytest.fixture(scope="session", autouse=True)
def absl_keeps_its_hands_off_pytests_stderr():
    """absl's logging handler (absl comes with rouge_score, imported by the generation metrics) holds the stderr of
    the moment it was made: pytest's capture file. Its close() closes any stream that is not the current sys.stderr,
    and Hydra, run in-process by the CLI tests, closes every handler when it configures logging, while the test's
    capsys is sys.stderr: pytest's own capture file was closed and the session ended without a summary ("lost
    sys.stderr"). Pointing the handler at the process's real stderr, which absl never closes, prevents that."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        yield
        return
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    yield


def compose_run(overrides: List[str], run_dir: Path):
    """hydra_conf + overrides → validated RunConfig, exactly as the CLI composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config import register_schema, to_run_config

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "hydra_conf")):
        run = to_run_config(compose("config", overrides=overrides))
    run.run_dir = str(run_dir)
    return run


def tiny_llama_run(model_dir: Optional[Path] = None, logger: str = "disabled") -> List[str]:
    """Overrides of a small causal-LM run: the tiny Llama (hydra_conf/model/tiny_llama.yaml: 2 layers, hidden 64,
    random weights, no download) on the bundled legal instructions, W&B off. With model_dir (the tiny_llama_dir
    fixture), that directory's fixed weights and tokenizer instead, so that a reference can load the same model."""
    overrides = ["model=tiny_llama", "data=legal_instructions"]
    if model_dir is not None:
        overrides += [f"model.path={model_dir}", "model.init=pretrained", "model.tokenizer_path=null"]
    return [*overrides, f"logger.mode={logger}"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the session (starting one takes seconds; a second would compete for 2 cores)."""
    import ray

    from launch.local import start_ray
    from orchestrator.config import ClusterConfig

    start_ray(ClusterConfig(cpu_workers=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, hidden 64) with fixed random weights saved as safetensors, plus the bundled
    WordPiece tokenizer: a complete local model directory that both a run and a reference can load."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from orchestrator.model import resolve_model_path

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(directory)
    return directory
