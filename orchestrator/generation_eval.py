"""Generated answers on validation rows of instruction/chat data, scored with ROUGE-L and BLEU.

Loss says how likely the reference answer is; these say how close what the model actually writes comes to it.
Each example's prompt is its untrained prefix (everything before the first target token), its reference the
target tokens. Every rank generates the same few rows: under ZeRO-3 every forward pass gathers parameters
collectively, so all ranks must run the same number of them (synced_gpus keeps them in step regardless).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from orchestrator.data.formats import IGNORE_INDEX, Example
from orchestrator.metrics import format_samples, generation_metrics


def split_example(example: Example) -> Tuple[List[int], List[int]]:
    """(prompt ids, reference ids): the prompt ends where the first trained token starts."""
    start = next(i for i, t in enumerate(example.target) if t != IGNORE_INDEX)
    return example.input_ids[:start], [t for t in example.target[start:] if t != IGNORE_INDEX]


@torch.no_grad()
def generate_answers(model, examples: Sequence[Example], tokenizer, device: torch.device, max_new_tokens: int,
                     synced_gpus: bool) -> Tuple[List[str], List[str], List[str]]:
    """Greedy answers, one row at a time (no padding to get wrong). Returns prompts, answers, references."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    prompts, answers, references = [], [], []
    for example in examples:
        prompt_ids, reference_ids = split_example(example)
        input_ids = torch.tensor([prompt_ids], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, synced_gpus=synced_gpus, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        prompts.append(tokenizer.decode(prompt_ids, skip_special_tokens=True))
        answers.append(tokenizer.decode(output[0, len(prompt_ids):].tolist(), skip_special_tokens=True).strip())
        references.append(tokenizer.decode(reference_ids, skip_special_tokens=True).strip())
    model.train(was_training)
    return prompts, answers, references


def generation_report(model, examples: Sequence[Example], tokenizer, device: torch.device, rows: int,
                      max_new_tokens: int, synced_gpus: bool) -> Tuple[Dict[str, float], str]:
    """ROUGE-L and BLEU over the first `rows` validation examples, and a few samples for the log."""
    with_prompt = [e for e in examples if e.target and e.target[0] == IGNORE_INDEX][:rows]  # not plain text
    if not with_prompt:
        return {}, ""
    prompts, answers, references = generate_answers(model, with_prompt, tokenizer, device, max_new_tokens,
                                                    synced_gpus)
    return generation_metrics(answers, references), format_samples(prompts, answers, references)


def generated_answers(engine, examples: Sequence[Example], tokenizer, device: torch.device, rows: int,
                      max_new_tokens: int, note, world_size: int) -> Dict[str, float]:
    """The final evaluation's generation check: ROUGE-L and BLEU of greedy answers to the first `rows` validation
    rows as eval/rougeL, eval/bleu, and a few samples through `note` (the console). Every rank takes part (ZeRO-3
    gathers parameters for each generated token)."""
    if not rows:
        return {}
    metrics, samples = generation_report(engine.module, examples, tokenizer, device, rows, max_new_tokens,
                                         synced_gpus=world_size > 1)
    if samples:
        note(samples)
    return {f"eval/{k}": v for k, v in metrics.items()}
