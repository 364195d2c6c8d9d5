"""Saving a run, and bringing a freshly set-up run back to a checkpoint. Each stateful part
saves and loads its own state (the way torchtitan's checkpoint manager takes stateful
parts); this module only puts them together:

- the selector: the adapter layout (phase, kept adapters, their ranks) and the gates;
- the backend: every kept adapter matrix and its AdamW state, as the backend holds them
  (FSDP2 shards, ZeRO's gathered masters, replicated tensors);
- the loop: the optimizer step, the data position, the WeightLoRA+ rounds so far.

Tensor names come from ``keys``; the folder is written and read by ``storage``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from wlora_dist.checkpoint import keys, storage
from wlora_dist.checkpoint.meta import CheckpointMeta, check_compatible, read_meta, rows_per_step, run_identity
from wlora_dist.checkpoint.peft import lora_config_to_json
from wlora_dist.config import RunConfig
from wlora_dist.distributed.base import Backend
from wlora_dist.distributed.env import DistEnv
from wlora_dist.method.init import derive_seed
from wlora_dist.method.selector import LayoutEvent, Selector
from wlora_dist.method.weight_lora import WeightLoRA

log = logging.getLogger("wlora_dist")


@dataclass
class LoopState:
    """The training loop's part of a checkpoint."""

    step: int  # optimizer steps done
    rounds_log: list[dict[str, Any]] = field(default_factory=list)  # WeightLoRA+ rounds done so far


@dataclass
class Resumed:
    """What a resume brought back: the loop's state, and the layout change that rebuilt the
    adapters (the trainer's record of layout events keeps it)."""

    loop: LoopState
    event: LayoutEvent


def adapter_matrices(wl: WeightLoRA) -> dict[str, nn.Parameter]:
    """Kept adapters' A and B by their checkpoint names (independent of backend and world size)."""
    out = {}
    for s in wl.kept_sites():
        a, b = wl.adapter_params(s)
        name_a, name_b = keys.matrix_names(s.name)
        out[name_a], out[name_b] = a, b
    return out


def save_run(root: Path, cfg: RunConfig, env: DistEnv, selector: Selector, backend: Backend, loop: LoopState) -> Path:
    """Collective: every rank writes its shards; one folder, complete or absent."""
    wl = selector.wl
    tensors = keys.flatten(backend.adapter_state(adapter_matrices(wl), for_load=False), selector.state_tensors())
    layout = selector.layout()
    meta = CheckpointMeta(
        step=loop.step,
        pruned=layout["pruned"],
        kept=layout["kept"],
        ranks=layout["ranks"],
        rounds_log=loop.rounds_log,
        rows_consumed=loop.step * rows_per_step(cfg, env.world_size),
        world_size=env.world_size,
        backend=backend.name,
        identity=run_identity(cfg, wl),
        adapter_config=lora_config_to_json(wl.export_config(cfg.model.path)),
        time=time.time(),
    )
    return storage.save(root, loop.step, tensors, meta, cfg.to_dict(), env, cfg.checkpoint.keep_last)


def resume(path: Path, cfg: RunConfig, env: DistEnv, selector: Selector, backend: Backend) -> Resumed:
    """Bring a freshly set-up run to the checkpoint at ``path``: the selector replays its
    layout, then the backend's adapters and AdamW state, the selector's gates (resharded to
    this world size and backend) and this rank's RNG are loaded."""
    wl = selector.wl
    meta = read_meta(path)
    check_compatible(meta, run_identity(cfg, wl), path)
    event = selector.restore_layout(meta.step, meta.kept, meta.ranks, meta.pruned, backend)
    matrices = adapter_matrices(wl)
    adapters = backend.adapter_state(matrices, for_load=True)
    storage.load_tensors(path, keys.flatten(adapters, selector.state_tensors()), env.distributed)
    backend.load_adapter_state(matrices, adapters)
    fallback = derive_seed(cfg.train.seed, rank=env.global_rank, step=meta.step)
    same_rng = storage.restore_rng(path, env.global_rank, fallback)
    rows = rows_per_step(cfg, env.world_size)
    if meta.rows_consumed != meta.step * rows:
        log.warning(
            "resuming with a different global batch (%d rows per step; the checkpoint's run used %d)",
            rows,
            meta.rows_consumed // max(1, meta.step),
        )
    same = meta.world_size == env.world_size and same_rng
    log.info(
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
    return Resumed(LoopState(meta.step, list(meta.rounds_log)), event)
