"""Ulysses sequence parallelism, the building blocks: N ranks share each sequence. Every
rank runs the model on its own chunk of the tokens; in each attention layer one
all-to-all turns (this rank's chunk, every head) into (the whole sequence, 1/N of the
heads), attention runs over the whole sequence for those heads, and a second all-to-all
turns the result back. Everything else (embeddings, MLPs, norms, the loss) is per token
and runs on the chunk.

Two things make N ranks train exactly what one rank would:

- ``shard_batch``: positions are the sequence's (a packed row keeps its restarts), the
  labels are shifted before the split (the label of a chunk's last token is the first
  token of the next chunk), and the loss's denominator is the whole sequence's trained
  tokens, so the chunks' losses add up to the sequence's loss;
- ``ulysses_attention``: registered with transformers' attention interface, so any model
  using it gets the all-to-all, with grouped-query attention's few key/value heads
  replicated where the group has more ranks than they are. Packed rows are masked from
  the gathered positions (a token attends within its own document only).

Written here rather than taken from DeepSpeed 0.19's ``ulysses_sp``: its attention
(``UlyssesSPAttentionHF``) goes through deepspeed.comm (an initialised DeepSpeed, which the
FSDP2 backend does not start) and is built for one sequence length, and its
``UlyssesSPDataLoaderAdapter`` wraps a DataLoader of its own batch layout; this needs
torch's autograd-aware all-to-all only (gloo and NCCL) and takes the micro-batches our
collate makes. Its tiled loss is ours too (train.loss_shards, model/loss.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_to_all_single

from wlora_dist.distributed.spec import check_heads

IGNORE = -100  # transformers' ignore_index, as data/rows.py labels untrained tokens
ATTENTION = "wlora_ulysses"  # the name it is registered under in transformers' attention interface
_GROUP: dist.ProcessGroup | None = None  # the sequence-parallel group of this rank


def shard_batch(batch: dict[str, torch.Tensor], n: int, rank: int, pad_id: int) -> dict[str, torch.Tensor]:
    """This rank's chunk (``rank`` of ``n`` in its sequence-parallel group) of a collated
    (B, T) micro-batch: the rows right-padded to a multiple of n, global position ids,
    labels shifted before the split (``labels`` and ``shift_labels``, as transformers'
    causal-LM loss takes them), and ``num_items_in_batch``: the trained tokens of the whole
    micro-batch, so the loss of each chunk is its share of the micro-batch's mean."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, width = ids.shape
    pad = (-width) % n
    # Rows padded on the right count their positions from 0; their padding is never attended.
    pos = batch["position_ids"] if "position_ids" in batch else torch.arange(width).expand(rows, width)
    if pad:
        ids = F.pad(ids, (0, pad), value=pad_id)
        labels = F.pad(labels, (0, pad), value=IGNORE)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(pad).expand(rows, pad)], dim=1)
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    size = (width + pad) // n
    part = slice(rank * size, (rank + 1) * size)
    local = shifted[:, part].contiguous()
    return {
        "input_ids": ids[:, part].contiguous(),
        "position_ids": pos[:, part].contiguous(),
        "labels": local,
        "shift_labels": local,
        "num_items_in_batch": (shifted != IGNORE).sum(),
    }


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all: ``x`` split in N along ``scatter_dim``, part i to rank i of the group;
    the parts received joined along ``gather_dim`` (differentiable)."""
    n = dist.get_world_size(group)
    send = torch.stack([p.contiguous() for p in x.chunk(n, dim=scatter_dim)])
    received = all_to_all_single(torch.empty_like(send), send, group=group)
    return torch.cat(list(received.unbind(0)), dim=gather_dim)


def document_mask(positions: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, L, L) boolean mask of causal attention within each document of packed rows
    (a document starts where the position is 0); None when every row is one sequence, for
    which causal attention is the mask."""
    starts = positions == 0
    if not bool(starts[:, 1:].any()):
        return None
    doc = starts.cumsum(dim=1)
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool, device=positions.device).tril()
    return (same & causal)[:, None]


def ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention over the whole sequence for 1/N of the heads. In: (B, heads, chunk,
    head_dim) of this rank's chunk; out: (B, chunk, heads, head_dim), as transformers'
    attention functions return. ``attention_mask`` (the chunk's) is not used: the mask
    follows from the gathered positions."""
    group = _GROUP
    assert group is not None, "use_sequence_parallel(model, group) first"
    n = dist.get_world_size(group)
    heads, kv_heads = query.shape[1], key.shape[1]
    problem = check_heads(heads, kv_heads, n)  # refused before the run by the preflight
    if problem:
        raise ValueError(problem)
    if kv_heads < n:  # fewer key/value heads than ranks: each rank gets a copy of its group's
        key, value = (t.repeat_interleave(n // kv_heads, dim=1) for t in (key, value))
    q, k, v = (_exchange(t, 1, 2, group) for t in (query, key, value))  # (B, heads/N, L, d)
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    positions = kwargs.get("position_ids")
    mask = None
    if isinstance(positions, torch.Tensor):
        gathered = [torch.empty_like(positions) for _ in range(n)]
        dist.all_gather(gathered, positions.contiguous(), group=group)
        mask = document_mask(torch.cat(gathered, dim=1))
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=mask is None,
        scale=scaling,
    )
    return _exchange(out.transpose(1, 2), 1, 2, group), None  # (B, L, h/N, d) -> (B, chunk, h, d)


def use_sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """Make ``model`` (a transformers model) run its attention through ``ulysses_attention``
    over ``group``, the ranks that share each sequence."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    global _GROUP
    _GROUP = group
    AttentionInterface.register(ATTENTION, ulysses_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the chunk's mask, built cheaply and not used
    model.config._attn_implementation = ATTENTION
