"""Our loss (losses.loss_terms, used by the recipe's train_step and by metrics.evaluate) on peft's prompt-learning
models, in-process on CPU (no Ray): prompt tuning prepends its virtual tokens to the input, so the model's logits
have peft.virtual_tokens more positions than the labels; prefix tuning keeps them in the past key values. On a
batch of the bundled instruction rows our loss equals peft's own (the model's outputs.loss given labels)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.adapters import apply_adapter
from orchestrator.config import DataConfig, Init, ModelConfig, PeftConfig, Task
from orchestrator.data import encode_data, read_data
from orchestrator.data.batching import collate, model_inputs
from orchestrator.data.formats import IGNORE_INDEX
from orchestrator.losses import loss_terms
from orchestrator.metrics import evaluate
from orchestrator.model import build_model, load_tokenizer

TINY = ModelConfig(path="builtin:tiny-llama", tokenizer_path="minilm", task=Task.causal_lm, init=Init.random)
VIRTUAL = 8


@pytest.fixture(scope="module")
def instructions():
    tokenizer = load_tokenizer(TINY)
    data = encode_data(read_data(DataConfig(path="sample:legal_instructions"), Task.causal_lm, seed=0), tokenizer,
                       max_length=96)
    return data, tokenizer.pad_token_id


def adapted(strategy: str):
    torch.manual_seed(0)
    model = apply_adapter(build_model(TINY, None, torch.float32), strategy, PeftConfig(virtual_tokens=VIRTUAL),
                          Task.causal_lm)
    with torch.no_grad():  # trained-looking virtual tokens, not peft's initialisation
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.mark.parametrize("strategy", ["prompt", "prefix"])
def test_our_loss_equals_peft_loss_on_instruction_rows(instructions, strategy):
    data, pad = instructions
    batch = collate(data.validation[:4], pad)  # right-padded rows of different lengths
    labels = batch.pop("labels")
    assert (labels[:, 0] == IGNORE_INDEX).all()  # instruction rows start with their (untrained) prompt
    with torch.no_grad():
        logits = adapted(strategy)(**model_inputs(batch)).logits
        expected = adapted(strategy)(**model_inputs(batch), labels=labels).loss
    # prompt tuning: the virtual tokens' positions come first; prefix tuning: none in the logits
    assert logits.shape[1] == labels.shape[1] + (VIRTUAL if strategy == "prompt" else 0)
    loss_sum, weight = loss_terms(logits, labels, Task.causal_lm)
    assert weight == (labels[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(loss_sum / weight, expected, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_text_rows_leave_the_first_token_out_as_every_strategy(instructions):
    """Where labels[:, 0] is a target (text rows), peft counts the last virtual position's prediction of it;
    we never train the first token (formats.add_example): ours is peft's loss with labels[:, 0] ignored."""
    data, pad = instructions
    batch = collate(data.validation[:4], pad)
    batch.pop("labels")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    model = adapted("prompt")
    with torch.no_grad():
        loss_sum, weight = loss_terms(model(**model_inputs(batch)).logits, labels, Task.causal_lm)
        first_ignored = labels.clone()
        first_ignored[:, 0] = IGNORE_INDEX
        expected = model(**model_inputs(batch), labels=first_ignored).loss
    torch.testing.assert_close(loss_sum / weight, expected, rtol=1e-5, atol=1e-5)


def test_evaluation_of_a_prompt_tuned_model_gives_peft_loss(instructions):
    """metrics.evaluate, where the run died before training (logit and target counts differed)."""
    data, pad = instructions
    rows = data.validation[:6]
    model = adapted("prompt")
    metrics = evaluate(model, rows, Task.causal_lm, batch_size=6, pad_token_id=pad, device=torch.device("cpu"))
    batch = collate(rows, pad)
    labels = batch.pop("labels")
    with torch.no_grad():
        expected = model(**model_inputs(batch), labels=labels).loss.item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_prompt_tuning_trains_on_our_loss(instructions):
    """A few AdamW steps on loss_terms: the loss is finite and falls, and only the soft prompt moved."""
    data, pad = instructions
    model = adapted("prompt").train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-1)
    batch = collate(data.train[:8], pad)
    labels = batch.pop("labels")
    losses = []
    for _ in range(5):
        loss_sum, weight = loss_terms(model(**model_inputs(batch)).logits, labels, Task.causal_lm)
        (loss_sum / weight).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss_sum / weight).item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert sum(p.numel() for p in trained) == VIRTUAL * model.config.hidden_size


def test_logits_shorter_than_the_labels_are_an_error():
    with pytest.raises(ValueError, match="5 logit positions for 6 labels"):
        loss_terms(torch.zeros(1, 5, 3), torch.zeros(1, 6, dtype=torch.long), Task.causal_lm)
