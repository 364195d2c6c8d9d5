"""Projections of the gate vector w: pure tensor-in / tensor-out math.

No torch.distributed here: every rank calls these on bitwise-identical inputs and so
gets bitwise-identical outputs (all ops are deterministic on CPU and CUDA).
"""

from __future__ import annotations

import torch


def topk_mask(w: torch.Tensor, k: int, by: str = "signed") -> torch.Tensor:
    """Boolean mask of the k entries to keep.

    ``by="signed"`` keeps the k largest values (the authors' code); ``"magnitude"`` the
    k largest |w|. Ties break by adapter index (lower index wins), so the kept set never
    depends on sort stability or the device.
    """
    if w.dim() != 1:
        raise ValueError(f"gates must be a vector, got shape {tuple(w.shape)}")
    n = w.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]")
    if by not in ("signed", "magnitude"):
        raise ValueError(f"topk_by must be 'signed' or 'magnitude', got {by!r}")
    score = w.detach().double() if by == "signed" else w.detach().double().abs()
    # Stable sort on (-score) keeps index order among equal scores: deterministic ties.
    order = torch.sort(-score, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=w.device)
    mask[order[:k]] = True
    return mask


def project_topk(w: torch.Tensor, k: int, by: str = "signed") -> torch.Tensor:
    """Hard thresholding: keep the k best entries, zero the rest (no renormalisation)."""
    return torch.where(topk_mask(w, k, by), w, torch.zeros_like(w))


def project_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {x >= 0, sum x = 1} (Duchi et al. 2008), O(n log n).

    Sort descending, find the largest rho with u_rho - (cumsum_rho - 1) / rho > 0, shift
    by theta = (cumsum_rho - 1) / rho and clip at 0. Computed in float64.
    """
    if w.dim() != 1:
        raise ValueError(f"gates must be a vector, got shape {tuple(w.shape)}")
    v = w.detach().double()
    u = torch.sort(v, descending=True).values
    css = torch.cumsum(u, 0)
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    cond = u - (css - 1.0) / idx > 0
    rho = int(torch.nonzero(cond).max().item()) + 1
    theta = (css[rho - 1] - 1.0) / rho
    return torch.clamp(v - theta, min=0.0).to(w.dtype)


def project(w: torch.Tensor, method: str, k: int = 0, by: str = "signed") -> torch.Tensor:
    """Dispatch on the configured projection ("topk", "simplex" or "none")."""
    if method == "topk":
        return project_topk(w, k, by)
    if method == "simplex":
        return project_simplex(w)
    if method == "none":
        return w.clone()
    raise ValueError(f"unknown projection {method!r}")
