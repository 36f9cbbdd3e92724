"""The forgetting check, a data mix and packing in one tiny real run (1 Ray worker, tiny Llama, 2 steps).

forgetting/loss_before must equal a single-process evaluation of the untrained model on the reference set;
a mix of two datasets reports each one's validation loss beside the overall one; packed training rows go
through the real loop (their losses are checked against unpacked ones in tests/unit/test_packing.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator.__main__ import execute
from orchestrator.data import encode_data, read_data
from orchestrator.metrics import evaluate
from orchestrator.model import build_model, load_tokenizer
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray


def test_forgetting_before_and_after_and_per_dataset_validation(ray_cluster, tiny_llama_dir, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"Note {i}: the meeting moved to room {i}."}) + "\n"
                             for i in range(20)), encoding="utf-8")
    run = compose_run([*tiny_llama_run(tiny_llama_dir), "data.format=auto", "trainer.max_steps=2",
                       "trainer.micro_batch_size=4", "cluster.cpu_workers=1", "data.max_length=96",
                       "data.max_validation_rows=4", "optim.lr=3e-3",
                       f"data.mix=[{{path:'sample:legal_instructions',weight:3}},{{path:'{notes}',weight:1}}]",
                       "data.reference_path=sample:general_reference", "data.packing=true"], tmp_path)
    metrics = execute(run)

    assert all(math.isfinite(loss) for loss in metrics["train/loss_history"])
    for key in ("loss_before", "loss_after", "perplexity_before", "perplexity_after"):
        assert math.isfinite(metrics[f"forgetting/{key}"])
    for name in ("legal_instructions", "notes"):
        assert math.isfinite(metrics[f"eval/{name}/loss"]) and math.isfinite(metrics[f"eval_before/{name}/loss"])

    # the untrained model, one process, no Ray: the same figure
    torch.manual_seed(run.trainer.seed)
    tokenizer = load_tokenizer(run.model)
    data = encode_data(read_data(run.data, run.model.task, run.trainer.seed), tokenizer, run.data.max_length)
    model = build_model(run.model, None, torch.float32)
    reference = evaluate(model, data.reference, run.model.task, 4, tokenizer.pad_token_id, torch.device("cpu"))
    assert metrics["forgetting/loss_before"] == pytest.approx(reference["loss"], rel=1e-5)
