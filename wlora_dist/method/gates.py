"""The gate step: SGD on the gate vector w, then the projection. Pure tensor math."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wlora_dist.config import SelectionConfig
from wlora_dist.method.projections import project


@dataclass(frozen=True)
class GateStep:
    gates: torch.Tensor  # the new w
    grad_norm: float  # ||grad_w|| of this step
    projected: bool  # whether the projection ran


def gate_step(
    gates: torch.Tensor,
    grad: torch.Tensor,
    lr_w: float,
    cfg: SelectionConfig,
    project_now: bool,
    force_projection: bool = False,
    k: int | None = None,
) -> GateStep:
    """w <- P(w - lr_w * grad_w): SGD on the gates, then the projection.

    The projection is skipped while ||grad_w|| <= cfg.grad_eps (at step 1 B = 0 makes
    grad_w exactly 0, and projecting all-equal gates would pick an arbitrary set), unless
    ``force_projection`` (the prune event needs a projected w). ``k`` overrides cfg.k
    (WeightLoRA+ halves it every round); cfg.k may be a share of n = gates.numel().
    """
    grad_norm = float(torch.linalg.vector_norm(grad.double()))
    new = gates.detach() - lr_w * grad.detach().to(gates.dtype)
    do_project = force_projection or (project_now and grad_norm > cfg.grad_eps)
    if do_project:
        new = project(new, cfg.method, cfg.kept(gates.numel()) if k is None else k, cfg.topk_by)
    return GateStep(new, grad_norm, do_project)
