"""WeightLoRA+ rank doubling of one adapter: pure math on full (unsharded) tensors.

An adapter computes B A x (scaled); A is r x in, B is out x r. Doubling its rank:

- smart: A^T = Q R (reduced QR, Q in x r orthonormal). A' = [Q^T ; P^T] with P an
  orthonormal basis of (I - Q Q^T) N for random N, B' = [B R^T , 0]. Then
  B' A' = B R^T Q^T = B A: the model output does not change, and the new directions are
  orthogonal to the old ones (the product-preserving extension of docs/method.md).
- dummy: A' = [A ; N] (N kaiming-uniform rows, as a fresh A), B' = [B , 0]: B' A' = B A.
- restart: a fresh A (kaiming-uniform), B = 0: the adapter starts over.

Random draws come from the caller's generator (seeded by adapter and round), so every
rank computes bitwise the same A', B'.
"""

from __future__ import annotations

import torch

from wlora_dist.method.init import kaiming_a


def double_rank(a: torch.Tensor, b: torch.Tensor, how: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r from (A, B) of rank r (float32, CPU)."""
    a, b = a.float().cpu(), b.float().cpu()
    r, n_in = a.shape
    out = b.shape[0]
    if 2 * r > n_in:
        raise ValueError(f"cannot double rank {r} of an adapter with {n_in} inputs (2r > in)")
    zeros = torch.zeros(out, r, dtype=torch.float32)
    if how == "smart":
        q, rr = torch.linalg.qr(a.T)  # a.T = q @ rr
        n = torch.randn(n_in, r, generator=gen, dtype=torch.float64).float()
        n = n - q @ (q.T @ n)
        n = n - q @ (q.T @ n)  # twice: numerically orthogonal to Q
        p, _ = torch.linalg.qr(n)
        return torch.cat([q.T, p.T], 0).contiguous(), torch.cat([b @ rr.T, zeros], 1).contiguous()
    if how == "dummy":
        return torch.cat([a, kaiming_a(r, n_in, gen)], 0), torch.cat([b, zeros], 1)
    if how == "restart":
        return kaiming_a(2 * r, n_in, gen), torch.zeros(out, 2 * r, dtype=torch.float32)
    raise ValueError(f"selection.extension={how!r}: use smart, dummy or restart")
