"""How a collated micro-batch becomes this rank's model inputs: moved to the device and,
under sequence parallelism (distributed.sequence_parallel = N), cut to this rank's chunk
of every row (distributed/sequence_parallel.py: global positions, labels shifted before
the split, the whole micro-batch's trained tokens as the loss's denominator)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wlora_dist.data.pipeline import count_tokens, model_inputs
from wlora_dist.distributed.sequence_parallel import shard_batch

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepInputs:
    device: torch.device
    sequence_parallel: int = 1  # ranks sharing each sequence
    rank_in_group: int = 0  # this rank's chunk

    def __call__(self, batch: Batch) -> Batch:
        inputs = model_inputs(batch)
        if self.sequence_parallel > 1:
            inputs = shard_batch(inputs, self.sequence_parallel, self.rank_in_group, pad_id=0)  # pads: no label
        return {k: v.to(self.device) for k, v in inputs.items()}

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's loss as the mean over ranks needs it: a chunk's loss is its share of
        the sequence's, so N times it averages over the world to the mean over sequences
        (and so do the gradients the backends average)."""
        return loss * self.sequence_parallel if self.sequence_parallel > 1 else loss

    def tokens(self, batch: Batch) -> float:
        """This rank's share of the micro-batch's real tokens."""
        return count_tokens(batch) / self.sequence_parallel
