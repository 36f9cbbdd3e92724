"""Which rows each worker sees at each step, and how rows become padded tensors.

The schedule is a pure function of (seed, step): every rank computes the same global batch and takes
its own slice, a resumed run continues at the same rows, and a single-process reference can replay
exactly the global batch that the distributed run trained on.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from orchestrator.data.formats import IGNORE_INDEX, Example


class GlobalBatchSchedule:
    """Global batches of `global_batch_size` row indices, drawn epoch after epoch without replacement.

    With `class_of_row` given (balanced sampling), rows are drawn with replacement so that every class
    is equally likely, which shows rare classes to the model as often as common ones. With `row_weights`
    (data.mix, see mix_row_weights), rows are drawn with replacement in proportion to their weights.
    Either way the draw of a step is seeded by (seed, step) alone, so a resumed run draws the same rows.
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int,
                 class_of_row: Optional[Sequence[int]] = None, row_weights: Optional[torch.Tensor] = None):
        self.num_rows, self.global_batch_size, self.seed = num_rows, global_batch_size, seed
        self.row_weights = row_weights
        if class_of_row is not None and row_weights is None:
            counts = torch.bincount(torch.as_tensor(class_of_row))
            self.row_weights = 1.0 / counts[torch.as_tensor(class_of_row)].double()

    def global_batch(self, step: int) -> List[int]:
        if self.row_weights is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            return torch.multinomial(self.row_weights, self.global_batch_size, True, generator=generator).tolist()
        start = step * self.global_batch_size
        rows = []
        while len(rows) < self.global_batch_size:
            epoch, offset = divmod(start + len(rows), self.num_rows)
            permutation = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
            rows.extend(permutation[offset: offset + self.global_batch_size - len(rows)].tolist())
        return rows

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int,
                      lengths: Optional[Sequence[int]] = None) -> List[List[int]]:
        """This rank's micro-batches of the step: the global batch laid out as [accumulation, rank, micro].

        With `lengths`, the global batch is first sorted by row length, so that each micro-batch holds rows
        of similar length (little padding) and all ranks work on similar lengths at the same moment. The
        loss is normalised over the whole global batch, so the order inside it changes nothing but speed.
        """
        rows = self.global_batch(step)
        if lengths is not None:
            rows = sorted(rows, key=lambda row: lengths[row])
        per_micro_step = world_size * micro_batch_size
        return [rows[a * per_micro_step + rank * micro_batch_size: a * per_micro_step + (rank + 1) * micro_batch_size]
                for a in range(len(rows) // per_micro_step)]


def mix_row_weights(source_of_row: Sequence[int], source_weights: Sequence[float],
                    class_of_row: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Sampling weights for data.mix: the rows of dataset d together weigh source_weights[d], so d fills that
    share of every global batch (in expectation) whatever its size. With class_of_row (balanced sampling),
    the classes inside each dataset are also equally likely."""
    source = torch.as_tensor(source_of_row)
    classes = torch.as_tensor(class_of_row) if class_of_row is not None else torch.zeros_like(source)
    k = int(classes.max()) + 1
    group = source * k + classes  # rows of one (dataset, class) share one sampling weight
    rows_in_group = torch.bincount(group)[group].double()
    groups_of_source = torch.bincount(torch.unique(group) // k, minlength=len(source_weights)).double()
    return torch.as_tensor(source_weights, dtype=torch.float64)[source] / groups_of_source[source] / rows_in_group


def pack_examples(examples: Sequence[Example], max_length: int) -> List[Example]:
    """data.packing: consecutive examples concatenated into rows of at most max_length tokens.

    position_ids restart at 0 with each example; from them transformers derives each example's own causal
    mask, so no token attends across examples (see model_inputs). Each example's first target becomes
    IGNORE_INDEX: unpacked, nothing predicts an example's first token, and packed, the previous example's
    last token must not learn to either. So the counted target tokens, the loss normaliser, stay the same.
    """
    rows: List[Example] = []
    for example in examples:
        if not rows or len(rows[-1].input_ids) + len(example.input_ids) > max_length:
            rows.append(Example([], [], []))
        row = rows[-1]
        row.input_ids += example.input_ids
        row.target += [IGNORE_INDEX] + list(example.target[1:])
        row.position_ids += list(range(len(example.input_ids)))
    return rows


def model_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The model's arguments for a collated batch (labels taken out). A packed batch goes without its
    attention mask: transformers (5.x, models built on create_causal_mask: Llama, Qwen, Mistral, ...) then
    finds the examples from the restarting position_ids and masks attention between them; a KV cache
    would turn that detection off, hence use_cache=False."""
    inputs: Dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:
        inputs.pop("attention_mask")
        inputs["use_cache"] = False
    return inputs


def collate(examples: Sequence[Example], pad_token_id: int, length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch (or to `length`); targets are padded with IGNORE_INDEX. Packed
    rows also get position_ids; their padding counts from 0 as one more sequence, which no real token attends
    to. Packed batches are padded to data.max_length: one shape for every step, so kernels compiled for a shape
    (flex attention) compile once."""
    length = max([len(e.input_ids) for e in examples] + [length or 0])
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        input_ids[i, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[i, : len(example.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(examples[0].target, int):
        batch["labels"] = torch.tensor([e.target for e in examples])
    else:
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for i, example in enumerate(examples):
            labels[i, : len(example.target)] = torch.tensor(example.target)
        batch["labels"] = labels
    if examples[0].position_ids is not None:
        positions = torch.arange(length).repeat(len(examples), 1)
        for i, example in enumerate(examples):
            positions[i, : len(example.position_ids)] = torch.tensor(example.position_ids)
            positions[i, len(example.position_ids):] -= len(example.position_ids)
        batch["position_ids"] = positions
    return batch


def shard_for_evaluation(num_rows: int, rank: int, world_size: int) -> List[Optional[int]]:
    """This rank's share of the validation rows, padded with None so that every rank runs the same
    number of forward passes (ZeRO-3 gathers parameters collectively: unequal counts would hang)."""
    per_rank = -(-num_rows // world_size)
    share: List[Optional[int]] = list(range(rank * per_rank, min(num_rows, (rank + 1) * per_rank)))
    return share + [None] * (per_rank - len(share))
