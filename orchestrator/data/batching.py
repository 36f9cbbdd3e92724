"""Which rows each worker sees at each step, and how rows become padded tensors.

The schedule is a pure function of (seed, step): every rank computes the same global batch and takes
its own slice, a resumed run continues at the same rows, and a single-process reference can replay
exactly the global batch that the distributed run trained on.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from orchestrator.data.formats import IGNORE_INDEX, Example


class GlobalBatchSchedule:
    """Global batches of `global_batch_size` row indices, drawn epoch after epoch without replacement.

    With `class_of_row` given (balanced sampling), rows are drawn with replacement so that every class
    is equally likely, which shows rare classes to the model as often as common ones.
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int,
                 class_of_row: Optional[Sequence[int]] = None):
        self.num_rows, self.global_batch_size, self.seed = num_rows, global_batch_size, seed
        self.row_weights = None
        if class_of_row is not None:
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


def collate(examples: Sequence[Example], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch; targets are padded with IGNORE_INDEX."""
    length = max(len(e.input_ids) for e in examples)
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
    return batch


def shard_for_evaluation(num_rows: int, rank: int, world_size: int) -> List[Optional[int]]:
    """This rank's share of the validation rows, padded with None so that every rank runs the same
    number of forward passes (ZeRO-3 gathers parameters collectively: unequal counts would hang)."""
    per_rank = -(-num_rows // world_size)
    share: List[Optional[int]] = list(range(rank * per_rank, min(num_rows, (rank + 1) * per_rank)))
    return share + [None] * (per_rank - len(share))
