"""LoRA through the whole orchestrator on CPU: one worker (no ZeRO: the plain engine) and two ZeRO-3
workers; the export holds the adapter and the merged model, which gives the adapter model's logits."""

from __future__ import annotations

import pytest
import torch

from orchestrator.__main__ import execute
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("workers", [1, 2])
def test_lora_trains_and_exports_merged_weights(ray_cluster, tiny_llama_dir, tmp_path, workers):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = compose_run([*tiny_llama_run(tiny_llama_dir), "strategy=lora", "peft.rank=8", "trainer.max_steps=6",
                       "trainer.micro_batch_size=4", f"cluster.cpu_workers={workers}", "data.max_length=96",
                       "data.max_validation_rows=8", "optim.lr=1e-2", "optim.warmup_ratio=0"], tmp_path)
    metrics = execute(run)
    losses = metrics["train/loss_history"]
    assert losses[-1] < losses[0]
    export = tmp_path / "export"
    assert (export / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                        export / "adapter").eval()
    ids = torch.randint(5, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(base, merged(input_ids=ids).logits, atol=1e-3), "the adapter changed the model"


def test_prompt_tuning_trains_on_our_loss_and_its_adapter_predicts(ray_cluster, tiny_llama_dir, tmp_path):
    """strategy=prompt: the logits begin with the virtual tokens' positions (losses.input_positions). One worker,
    4 steps: the evaluation before training and training run, the losses are finite, the validation loss falls,
    the generation check runs, the final validation loss is peft's own loss of the exported adapter on those rows,
    and the adapter-only export (prompt tuning does not merge) predicts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.data import encode_data, read_data
    from orchestrator.data.batching import collate
    from orchestrator.data.readers import Row
    from orchestrator.predict import Predictor

    run = compose_run([*tiny_llama_run(tiny_llama_dir), "strategy=prompt", "peft.virtual_tokens=8",
                       "trainer.max_steps=4", "trainer.micro_batch_size=4", "cluster.cpu_workers=1",
                       "data.max_length=96", "data.max_validation_rows=8", "trainer.eval_generate_rows=2",
                       "optim.lr=1e-1", "optim.warmup_ratio=0"], tmp_path)
    metrics = execute(run)
    losses = metrics["train/loss_history"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert metrics["eval/loss"] < metrics["eval_before/loss"]  # the same rows (each step's are others)
    assert "eval/rougeL" in metrics
    export = tmp_path / "export"
    assert (export / "adapter" / "adapter_config.json").is_file() and not (export / "config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    validation = encode_data(read_data(run.data, run.model.task, run.trainer.seed), tokenizer,
                             run.data.max_length).validation
    batch = collate(validation, tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), export / "adapter").eval()
    with torch.no_grad():
        peft_loss = model(**batch).loss.item()  # peft pads the labels for the virtual tokens itself
    assert metrics["eval/loss"] == pytest.approx(peft_loss, rel=1e-4)

    predictor = Predictor(str(export), device="cpu")
    row = Row({"instruction": "Is this clause unfair?", "input": "We may end it."}, "test:1")
    (prediction,) = predictor.predict([row], max_new_tokens=4)
    assert isinstance(prediction["prediction"], str)
