"""The causal-LM loss in tiles (``train.loss_shards``): at 128k vocabulary the logits'
fp32 copies dominate the step's peak (transformers' ForCausalLMLoss keeps the fp32
log-softmax for backward, then nll's and log-softmax's gradients come on top: three fp32
copies of the logits, 5.9 GiB at 8B x 2 x 2048).

The tiling is DeepSpeed's ``TiledFusedLogitsLoss`` (the Arctic long-sequence training
code): each tile's loss is computed and back-propagated inside the forward, its gradient
written into one buffer of the logits' size, so one tile's fp32 tensors exist at a time.
We install it as the model's ``loss_function`` (transformers' own hook), so the model, its
lm_head and every backend stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _tile_loss(_owner: object, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one tile, in fp32 as transformers computes it."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def tiled_causal_lm_loss(shards: int) -> Callable[..., torch.Tensor]:
    """A drop-in for transformers' ForCausalLMLoss computing it in ``shards`` tiles."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    def loss_function(
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.masked_fill(shift_labels == ignore_index, -100).to(logits.device)
        x = logits.reshape(1, -1, vocab_size)  # [1, tokens, V]: tiles split the tokens
        y = shift_labels.reshape(1, -1)
        n = min(shards, x.shape[1])
        total = TiledFusedLogitsLoss.apply(_tile_loss, None, x, y, None, n, [], "sum")
        count = num_items_in_batch if num_items_in_batch is not None else (y != -100).sum()
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
        return total / count

    return loss_function
