"""The legal demo end to end, in reduced form: MiniLM, 2 ZeRO-3 CPU workers, the bundled clause set.

Loss falls; the exported directory loads with transformers and gives the same logits as the trained
model's weights read back from the final sharded DeepSpeed checkpoint (an independent path to them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.__main__ import execute
from tests.conftest import compose_run

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    run = compose_run(["+experiment=legal_demo", "trainer.max_steps=16", "trainer.eval_every=8",
                       "trainer.micro_batch_size=8", "logger.mode=disabled", "data.max_validation_rows=40",
                       # the export is the last weights here, so that the final checkpoint (the training state, for
                       # resuming) is an independent path to them; the export of the best evaluation is tested in
                       # tests/integration/test_recipe_defaults.py
                       "trainer.select_best=false"], run_dir)
    return run, execute(run), run_dir


def test_loss_falls(demo):
    _, metrics, _ = demo
    losses = metrics["train/loss_history"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert metrics["eval/loss"] < metrics["eval_before/loss"]
    assert 0 <= metrics["eval/macro_f1"] <= 1


def test_export_loads_and_reproduces_the_trained_weights(demo):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, _, run_dir = demo
    export = run_dir / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    exported = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert exported.config.id2label[0] == "Arbitration"

    checkpoints = sorted(Path(run_dir, "checkpoints").glob("*/*/checkpoint_*/deepspeed"))
    assert checkpoints, "the final sharded checkpoint is kept"
    trained_state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints[-1]), tag="zero")
    trained = AutoModelForSequenceClassification.from_pretrained(export).eval()
    missing, unexpected = trained.load_state_dict(trained_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)

    texts = ["We may terminate your account at any time without notice.", "Contact us at help@example.com."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, trained(**batch).logits, rtol=1e-5, atol=1e-6)
