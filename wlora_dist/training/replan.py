"""The memory plan inside a run: logged against the budget before the first step, and
``memory.replan_at_prune`` (less activation checkpointing once only K adapters are left).

The plan is ``planning.memory_plan`` on the run's own ``BackendSpec``, so it describes the
backend that really runs (ZeRO-3 shards the base; replicated does not)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from wlora_dist.config import RunConfig
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.model.loading import disable_checkpointing, enable_checkpointing
from wlora_dist.planning.memory_plan import GiB, PlanInput, plan
from wlora_dist.planning.search import recommend, replan_after_prune
from wlora_dist.planning.sources import run_plan_input, shape_of_hf_config
from wlora_dist.planning.text import human
from wlora_dist.training.tracking import log


def memory_budget_gib(cfg: RunConfig, env: DistEnv) -> float:
    """memory.budget_gib, else the GPU's memory; 0 on a CPU run without a budget."""
    if cfg.memory.budget_gib:
        return cfg.memory.budget_gib
    if env.device.type == "cuda":
        return torch.cuda.get_device_properties(env.device).total_memory / GiB
    return 0.0


def plan_input(
    cfg: RunConfig, env: DistEnv, spec: BackendSpec, model: nn.Module, kept: list[tuple[int, str]] | None
) -> PlanInput | None:
    """This run's plan input at its budget (None: no budget on a CPU run, or a model
    config the planner does not know)."""
    budget = memory_budget_gib(cfg, env)
    if not budget:
        return None
    try:
        shape = shape_of_hf_config(model.config.to_dict())
    except (KeyError, TypeError):  # not a Llama-like config: nothing to say
        return None
    inp = run_plan_input(cfg, shape, env.world_size, spec, env.device.type == "cuda", kept)
    return replace(inp, gpu_gib=budget)


def log_plan(inp: PlanInput | None) -> None:
    """The planner's per-rank peak against the budget, before the first step: an OOM
    foretold is cheaper than one met."""
    if inp is None:
        return
    p = plan(inp)
    log.info(
        "memory plan per rank (%s): %s in the selection phase, %s after the prune event, of %s "
        "(wlora-dist plan --config ... for the breakdown)",
        inp.backend.describe(inp.world_size),
        human(p.before.total),
        human(p.after.total),
        human(p.budget),
    )
    if not (p.fits_before and p.fits_after):
        recs = recommend(p.inp)
        hint = f"; settings that fit: {recs[0][0]}" if recs else ""
        log.warning("the memory plan says this run does not fit %s per rank%s", human(p.budget), hint)


@dataclass(frozen=True)
class Replan:
    activation_checkpointing: bool
    checkpoint_every_n_layers: int
    planned_gib: float
    budget_gib: float


def replan_at_prune(inp: PlanInput | None, model: nn.Module, info: Callable[..., None]) -> Replan | None:
    """With K adapters left (``inp.kept``), switch activation checkpointing off when the
    plan says the rest of the run fits the budget without it, else keep it on the fewest
    layers that fit. The same math (checkpointing only recomputes), a faster step; the
    global batch unchanged. ``model``: the transformers model; ``info``: where its log line goes."""
    if inp is None:
        info("re-plan at the prune event: the planner does not know this model; nothing changed")
        return None
    kept = len(inp.kept or ())
    switched = replan_after_prune(inp)
    budget = inp.gpu_gib - inp.reserve_gib
    if switched is None:
        info(
            "re-plan at the prune event: %d adapters need %s per rank without activation checkpointing, and "
            "checkpointing fewer layers does not fit the %.1f GiB budget either: it stays as it is",
            kept,
            human(plan(replace(inp, activation_checkpointing=False)).after.total),
            budget,
        )
        return None
    planned = plan(switched).after.total
    if not switched.activation_checkpointing:
        # transformers and peft made the embedding output require grad for checkpointing, so
        # every layer upstream of the first adapter built a graph; without it none is needed.
        disable_checkpointing(model)
        what = "activation checkpointing switched off"
    else:
        enable_checkpointing(model, switched.checkpoint_every)
        what = f"activation checkpointing of every {switched.checkpoint_every}th layer only"
    info(
        "re-plan at the prune event: %d adapters fit %s per rank (of %.1f GiB) with %s for the rest of the run",
        kept,
        human(planned),
        budget,
        what,
    )
    return Replan(switched.activation_checkpointing, switched.checkpoint_every, planned / GiB, budget)
