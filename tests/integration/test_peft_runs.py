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
