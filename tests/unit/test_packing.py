"""data.packing: a packed batch gives every token the loss it has when its example runs alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import DataConfig, ModelConfig, Task
from orchestrator.data import describe_data, encode_data, read_data
from orchestrator.data.batching import collate, model_inputs, pack_examples
from orchestrator.data.formats import IGNORE_INDEX
from orchestrator.errors import UserError
from orchestrator.losses import target_weight
from orchestrator.model import load_tokenizer, resolve_model_path
from tests.conftest import compose_run

MAX_LENGTH = 300


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(path="minilm"))


@pytest.fixture(scope="module")
def examples(tokenizer):
    raw = read_data(DataConfig(path="sample:legal_instructions", cache=False), Task.causal_lm, 0)
    raw.train = raw.train[:10]
    examples = encode_data(raw, tokenizer, 128).train
    assert len(examples) == 10
    return examples


def tiny_llama(attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(resolve_model_path("builtin:tiny-llama"), attn_implementation=attention)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def token_losses(model, batch) -> torch.Tensor:
    """Per-token losses of the counted targets (position t predicts token t+1), in reading order."""
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                             ignore_index=IGNORE_INDEX)
    return losses[labels[:, 1:].flatten() != IGNORE_INDEX]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_losses(examples, tokenizer, attention):
    model = tiny_llama(attention)
    alone = torch.cat([token_losses(model, collate([e], tokenizer.pad_token_id)) for e in examples])
    rows = pack_examples(examples, MAX_LENGTH)
    assert 1 < len(rows) < len(examples) and len({len(r.input_ids) for r in rows}) > 1  # padding is exercised
    packed = collate(rows, tokenizer.pad_token_id)
    torch.testing.assert_close(token_losses(model, packed), alone, rtol=1e-5, atol=1e-5)
    # the loss normaliser (counted target tokens) is unchanged by packing
    unpacked = collate(examples, tokenizer.pad_token_id)
    assert target_weight(packed["labels"], Task.causal_lm) == target_weight(unpacked["labels"], Task.causal_lm)


def test_without_the_packed_positions_examples_would_attend_to_each_other(examples, tokenizer):
    model = tiny_llama("sdpa")
    alone = torch.cat([token_losses(model, collate([e], tokenizer.pad_token_id)) for e in examples])
    packed = collate(pack_examples(examples, MAX_LENGTH), tokenizer.pad_token_id)
    del packed["position_ids"]  # a plain padded batch: one long sequence per row
    assert not torch.allclose(token_losses(model, packed), alone, rtol=1e-3, atol=1e-3)


def test_packed_positions_restart_at_each_example_and_padding(examples, tokenizer):
    long_row = pack_examples(examples[:3], 10_000)[0]
    lengths = [len(e.input_ids) for e in examples[:3]]
    assert long_row.position_ids == [p for n in lengths for p in range(n)]
    assert long_row.target[lengths[0]] == IGNORE_INDEX  # nothing learns to predict an example's first token
    short_row = pack_examples(examples[3:4], 10_000)[0]
    batch = collate([long_row, short_row], tokenizer.pad_token_id)
    padding = batch["position_ids"][1, len(short_row.input_ids):]
    assert padding.tolist() == list(range(sum(lengths) - len(short_row.input_ids)))  # a sequence of its own


def test_data_report_counts_packed_rows_and_fill(tokenizer):
    cfg = DataConfig(path="sample:legal_instructions", cache=False, packing=True, max_length=128)
    data = encode_data(read_data(cfg, Task.causal_lm, 0), tokenizer)
    report = data.train_report
    assert report.packed_rows == len(data.train) < report.examples
    fill = report.tokens / (report.packed_rows * 128)
    assert f"packed into {report.packed_rows} rows of up to 128 tokens ({fill:.0%} full)" in describe_data(data)
    assert data.validation[0].position_ids is None  # validation stays unpacked


def test_packing_applies_to_causal_lm_only(tmp_path):
    with pytest.raises(UserError, match="data.packing=True is not allowed: false for model.task=classification"):
        compose_run(["data.packing=true"], tmp_path)


def test_packed_batches_take_one_shape_whatever_their_rows():
    """collate(..., length): every packed step has the same shape (kernels compiled per shape compile once);
    the padding is one more sequence of its own, masked out of attention and loss."""
    from orchestrator.data.formats import Example

    rows = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7], [0, 1, 2]), Example([8, 9], [IGNORE_INDEX, 9], [0, 1])]
    batch = collate(rows, pad_token_id=0, length=6)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].sum().item() == 5
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 3
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3]
