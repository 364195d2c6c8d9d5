"""The schedules: which optimizer step trains, projects or prunes the gates, and the LR
multiplier; pure functions of step counts.

Steps are 1-based optimizer steps (``optimizer_step``), never micro-steps.
"""

from __future__ import annotations

import math

from wlora_dist.config import OptimConfig, SelectionConfig


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


def run_lr_multiplier(optimizer_step: int, optim: OptimConfig, sel: SelectionConfig, max_steps: int) -> float:
    """The multiplier of optim.lr and selection.lr_w at ``optimizer_step``.

    selection.schedule constant (the authors' pipeline): the selection phase runs at the
    peak LR, and the warmup/decay schedule starts over at the prune event, spanning the
    steps after it. main: one schedule over the whole run. Without a selection phase
    (method none) the one schedule always applies.
    """
    if sel.method == "none" or sel.schedule == "main":
        return lr_multiplier(optimizer_step, optim, max_steps)
    if optimizer_step <= sel.steps:
        return 1.0
    return lr_multiplier(optimizer_step - sel.steps, optim, max(1, max_steps - sel.steps))


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


def projection_period(cfg: SelectionConfig) -> int:
    """P: project_every, or by default ceil(T / 2) (two projections over the phase: at T/2
    and at T; docs/method.md, "Defaults, by evidence")."""
    if cfg.project_every is None:
        return max(1, math.ceil(cfg.steps / 2))
    return cfg.project_every


def is_projection_step(optimizer_step: int, cfg: SelectionConfig) -> bool:
    """Project every P steps (P = 0: only at T), and always at the last selection step
    (WeightLoRA+: at the end of every round only)."""
    if cfg.rounds > 0:
        return round_index(optimizer_step, cfg) > 0
    period = projection_period(cfg)
    return in_selection(optimizer_step, cfg) and (
        (period > 0 and optimizer_step % period == 0) or optimizer_step == cfg.steps
    )
