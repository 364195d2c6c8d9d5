"""The gate step and the schedules: pure functions of step counts and tensors.

Steps are 1-based optimizer steps (``optimizer_step``), never micro-steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import OptimConfig, SelectionConfig
from .projections import project


def lr_multiplier(optimizer_step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak LR at ``optimizer_step`` (1-based): linear warmup, then decay.

    The same multiplier scales lr_w, as in the authors' pipeline.
    """
    if cfg.warmup_steps > 0 and optimizer_step <= cfg.warmup_steps:
        return optimizer_step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (optimizer_step - cfg.warmup_steps) / span))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def in_selection(optimizer_step: int, cfg: SelectionConfig) -> bool:
    """Whether the gates are trained at this step (1-based)."""
    return cfg.method != "none" and optimizer_step <= cfg.steps


def is_prune_step(optimizer_step: int, cfg: SelectionConfig) -> bool:
    """The prune event runs right after this step's update."""
    return cfg.method != "none" and optimizer_step == cfg.steps


def round_index(optimizer_step: int, cfg: SelectionConfig) -> int:
    """WeightLoRA+: the round (1..R) that ends at this step, else 0."""
    if cfg.rounds <= 0 or not in_selection(optimizer_step, cfg):
        return 0
    every = cfg.steps // cfg.rounds
    return optimizer_step // every if optimizer_step % every == 0 else 0


def round_k(n: int, round_: int) -> int:
    """Adapters kept after WeightLoRA+ round ``round_``: n // 2^round (at least 1)."""
    return max(1, n >> round_)


def is_projection_step(optimizer_step: int, cfg: SelectionConfig) -> bool:
    """Project every P steps, and always at the last selection step (WeightLoRA+: at
    the end of every round only)."""
    if cfg.rounds > 0:
        return round_index(optimizer_step, cfg) > 0
    return in_selection(optimizer_step, cfg) and (
        optimizer_step % cfg.project_every == 0 or optimizer_step == cfg.steps
    )


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
    (WeightLoRA+ halves it every round).
    """
    grad_norm = float(torch.linalg.vector_norm(grad.double()))
    new = gates.detach() - lr_w * grad.detach().to(gates.dtype)
    do_project = force_projection or (project_now and grad_norm > cfg.grad_eps)
    if do_project:
        new = project(new, cfg.method, cfg.k if k is None else k, cfg.topk_by)
    return GateStep(new, grad_norm, do_project)
