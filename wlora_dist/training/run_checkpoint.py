"""A run's checkpoint: what to write (adapters, AdamW state, gates, ``CheckpointMeta``) and
how a freshly set-up run is brought back to it. The storage itself (atomic folders, DCP
shards, RNG files) is checkpoint.py's; this module knows the run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from wlora_dist.config import RunConfig
from wlora_dist.distributed.base import Backend
from wlora_dist.distributed.env import DistEnv
from wlora_dist.method.init import derive_seed
from wlora_dist.method.selector import LayoutEvent, Selector
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.training import checkpoint
from wlora_dist.training.checkpoint import CheckpointMeta
from wlora_dist.training.export import lora_config_to_json
from wlora_dist.training.tracking import RunLogger, log

GATES_KEY = "wlora.gates"


def run_identity(cfg: RunConfig, wl: WeightLoRA) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed by it."""
    mc = wl.base_model.config
    return {
        "model": {k: getattr(mc, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers")},
        "sites": [s.name for s in wl.sites],
        "adapter.lora_rank": cfg.adapter.lora_rank,
        "adapter.lora_alpha": cfg.adapter.lora_alpha,
        "selection.method": cfg.selection.method,
        "selection.k": cfg.selection.k,
        "selection.steps": cfg.selection.steps,
        "selection.fold_gates": cfg.selection.fold_gates,
        "train.seed": cfg.train.seed,
    }


def rows_per_step(cfg: RunConfig, env: DistEnv) -> int:
    """Training rows one optimizer step consumes over all ranks (the data position's unit)."""
    return cfg.train.grad_accum_steps * cfg.train.micro_batch_size * env.world_size


def named_adapters(wl: WeightLoRA) -> dict[str, nn.Parameter]:
    """Kept adapters' A and B by a name independent of backend and world size."""
    out = {}
    for s in wl.kept_sites():
        a, b = wl.adapter_params(s)
        out[f"{s.name}.lora_A"], out[f"{s.name}.lora_B"] = a, b
    return out


def save_run(
    root: Path,
    step: int,
    cfg: RunConfig,
    env: DistEnv,
    selector: Selector,
    backend: Backend,
    rounds_log: list[dict[str, Any]],
) -> Path:
    """Collective: every rank writes its shards; one folder, complete or absent."""
    wl = selector.wl
    tensors = backend.checkpoint_tensors(named_adapters(wl), for_load=False)
    tensors[GATES_KEY] = wl.gates.detach()
    kept = wl.kept_sites()
    meta = CheckpointMeta(
        step=step,
        pruned=selector.pruned,
        kept=[s.name for s in kept],
        ranks={s.name: wl.lora_rank(s) for s in kept},
        rounds_log=rounds_log,
        rows_consumed=step * rows_per_step(cfg, env),
        world_size=env.world_size,
        backend=backend.name,
        identity=run_identity(cfg, wl),
        adapter_config=lora_config_to_json(wl.export_config(cfg.model.path)),
        time=time.time(),
    )
    return checkpoint.save(root, step, tensors, meta, cfg.to_dict(), env, cfg.checkpoint.keep_last)


def load_state(
    path: Path, meta: CheckpointMeta, cfg: RunConfig, env: DistEnv, wl: WeightLoRA, backend: Backend
) -> bool:
    """Load adapters, AdamW state and gates (resharded to this world size and backend) and
    this rank's RNG. Returns whether the saved RNG state was used (same world size)."""
    named = named_adapters(wl)
    tensors = backend.checkpoint_tensors(named, for_load=True)
    tensors[GATES_KEY] = wl.gates.detach()
    checkpoint.load_tensors(path, tensors, env.distributed)
    backend.load_checkpoint_tensors(named, tensors)
    fallback = derive_seed(cfg.train.seed, rank=env.global_rank, step=meta.step)
    return checkpoint.restore_rng(path, env.global_rank, fallback)


def resume(
    path: Path, cfg: RunConfig, env: DistEnv, selector: Selector, backend: Backend, logger: RunLogger
) -> tuple[CheckpointMeta, LayoutEvent]:
    """Bring a freshly set-up run to the checkpoint at ``path``: the same adapter layout
    (the selector replays it), then adapters, AdamW state, gates and this rank's RNG.
    Returns the checkpoint's meta and the layout event."""
    wl = selector.wl
    meta = checkpoint.read_meta(path)
    checkpoint.check_compatible(meta, run_identity(cfg, wl), path)
    event = selector.apply(selector.resume_change(meta.step, meta.kept, meta.ranks, meta.pruned), backend)
    used = load_state(path, meta, cfg, env, wl, backend)
    rows = rows_per_step(cfg, env)
    if meta.rows_consumed != meta.step * rows:
        log.warning(
            "resuming with a different global batch (%d rows per step; the checkpoint's run used %d)",
            rows,
            meta.rows_consumed // max(1, meta.step),
        )
    same = meta.world_size == env.world_size and used
    logger.info(
        "resumed from %s: step %d, %s, %d of %d adapters kept%s",
        path,
        meta.step,
        "after the prune event" if selector.pruned else "selection phase",
        len(wl.kept_sites()),
        wl.n,
        ""
        if same
        else f" (world size {meta.world_size} -> {env.world_size}: data order and dropout RNG re-derived, "
        "the run is close to, not bitwise, the uninterrupted one)",
    )
    return meta, event
