"""Generated-answer evaluation: prompts and references come from the example's mask; a model that writes the
reference scores ROUGE-L 1 and BLEU 100; a real tiny model runs through generate."""

from __future__ import annotations

import torch

from orchestrator.config import DataConfig, DataFormat, ModelConfig
from orchestrator.data import RawData, encode_data
from orchestrator.data.readers import Row
from orchestrator.generation_eval import generation_report, split_example
from orchestrator.model import load_tokenizer

ROWS = [Row({"instruction": "Is this clause unfair?", "input": "We may end the contract at any time.",
             "output": "Yes: it lets the provider terminate unilaterally."}, "t:1"),
        Row({"instruction": "Name the governing law.", "input": "This agreement is governed by Irish law.",
             "output": "Irish law."}, "t:2")]


def encoded():
    tokenizer = load_tokenizer(ModelConfig(path="minilm"))
    cfg = DataConfig(path="x", max_length=96, cache=False)
    data = encode_data(RawData(DataFormat.alpaca, ROWS, ROWS, None, cfg), tokenizer)
    return tokenizer, data.validation


class Parrot(torch.nn.Module):
    """Generates exactly the reference answer of whichever example it is asked about."""

    def __init__(self, examples):
        super().__init__()
        self.answers = {tuple(split_example(e)[0]): split_example(e)[1] for e in examples}

    def generate(self, input_ids, **_):
        return torch.tensor([input_ids[0].tolist() + self.answers[tuple(input_ids[0].tolist())]])


def test_prompt_and_reference_come_from_the_mask():
    tokenizer, examples = encoded()
    prompt, reference = split_example(examples[1])
    assert "governed by irish law" in tokenizer.decode(prompt)
    assert tokenizer.decode(reference, skip_special_tokens=True) == "irish law."


def test_a_model_that_writes_the_reference_scores_perfectly():
    tokenizer, examples = encoded()
    metrics, samples = generation_report(Parrot(examples), examples, tokenizer, torch.device("cpu"), rows=2,
                                         max_new_tokens=16, synced_gpus=False)
    assert metrics["rougeL"] == 1.0 and round(metrics["bleu"], 6) == 100.0
    assert "sample 1" in samples and "reference: yes : it lets the provider terminate unilaterally." in samples


def test_a_real_model_generates(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    tokenizer, examples = encoded()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train()
    metrics, _ = generation_report(model, examples, tokenizer, torch.device("cpu"), rows=1, max_new_tokens=4,
                                   synced_gpus=False)
    assert 0 <= metrics["rougeL"] <= 1 and 0 <= metrics["bleu"] <= 100
    assert model.training  # put back in training mode after generating
