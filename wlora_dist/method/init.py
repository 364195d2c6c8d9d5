"""Adapter initialisation and seed derivation: the one place either is done.

Every adapter's initial values come from a generator seeded by (run seed, adapter index)
alone, so they are bitwise the same on every rank, at any world size, sharding or module
traversal order: eager models, models built on meta and filled shard by shard, the
re-initialisation at the prune event and the WeightLoRA+ extension all draw here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Streams derived from one run seed are spaced by primes, so no two (adapter, round) or
# (rank, step) pairs of a run share a seed.
_ADAPTER_STRIDE = 1_000_003  # > any adapter count: seed s's adapters never meet seed s+1's
_ROUND_STRIDE = 7_919  # WeightLoRA+ rounds (per adapter) and resumed steps (per rank)


def derive_seed(seed: int, *, adapter: int | None = None, round_: int = 0, rank: int = 0, step: int = 0) -> int:
    """The seed of one random stream of a run with seed ``seed``.

    ``adapter`` given: the stream of that adapter's values (its init when ``round_`` is 0,
    its WeightLoRA+ extension at round ``round_``); identical on every rank.
    Otherwise the per-rank stream (dropout) of ``rank``, re-derived at ``step`` when a
    resume cannot restore the saved state (another world size)."""
    if adapter is not None:
        return seed * _ADAPTER_STRIDE + adapter + _ROUND_STRIDE * round_
    return seed + rank + _ROUND_STRIDE * step


def kaiming_a(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """What peft's LoRA init draws for an A of shape rows x cols (kaiming-uniform, a=sqrt(5))."""
    t = torch.empty(rows, cols, dtype=torch.float32)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
    return t


def initial_adapter_weights(
    adapter: int, a_shape: torch.Size | tuple[int, ...], b_shape: torch.Size | tuple[int, ...], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial (A, B) of adapter number ``adapter``, as peft initialises them (A
    kaiming-uniform, B zeros); float32, on CPU."""
    gen = torch.Generator().manual_seed(derive_seed(seed, adapter=adapter))
    return kaiming_a(a_shape[0], a_shape[1], gen), torch.zeros(tuple(b_shape), dtype=torch.float32)
