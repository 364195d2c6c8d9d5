"""One resolved run: what every part of a run reads, decided once.

A run config says what the user asked for; a ``ResolvedRun`` is what the run will do: the
backend (the launcher's choice applied, a user DeepSpeed JSON read once and merged), the
folders it reads and writes, the checkpoint it resumes from, and (once the data are known)
the step counts a run sized by epochs gets. It is frozen, as is the config it holds:
nothing changes either after it is made. The command line makes it once and hands it to
the preflight checks and the trainer; the trainer sizes it from its data
(``sized_by``), then the backends, the planner, the checkpoints and the logs read only it.

    run = resolve_run(load_config("configs/tiny_cpu.yaml"))
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from wlora_dist.checkpoint.folders import resolve_resume
from wlora_dist.config import ConfigError, RunConfig, validate
from wlora_dist.distributed.settings import BackendSettings
from wlora_dist.distributed.spec import BackendSpec, check_backend_supports, read_user_deepspeed_json, resolve_backend
from wlora_dist.paths import default_data_cache


@dataclass(frozen=True)
class RunPaths:
    """Where a run reads and writes."""

    out: Path  # output.dir
    adapter: Path  # the peft adapter, at the end
    report: Path  # selection reports
    checkpoints: Path  # checkpoint.dir, or <output.dir>/checkpoints
    logs: Path  # metrics.jsonl, tensorboard, trackers' ids
    data_cache: Path  # the tokenised data (data.cache_dir, or the shared cache: paths.default_data_cache)

    @classmethod
    def of(cls, cfg: RunConfig) -> RunPaths:
        out = Path(cfg.output.dir)
        return cls(
            out=out,
            adapter=out / "adapter",
            report=out / "report",
            checkpoints=Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints",
            logs=out / "logs",
            data_cache=Path(os.path.expanduser(cfg.data.cache_dir)) if cfg.data.cache_dir else default_data_cache(),
        )


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig  # frozen; its step counts final once ``sized``
    spec: BackendSpec  # the backend, decided once (resolve_backend)
    paths: RunPaths
    resume: Path | None  # the checkpoint this run resumes from (checkpoint.resume_from resolved)
    deepspeed_user: Mapping[str, Any] = field(default_factory=dict)  # the user's DeepSpeed JSON, read once
    sized: bool = False  # train.epochs / *_fraction / *_ratio turned into step counts

    def backend_settings(self, device_type: str) -> BackendSettings:
        """What this run's backend reads, on a machine whose device is ``device_type``."""
        return BackendSettings.of(self.cfg, self.spec, device_type, self.deepspeed_user)

    def sized_by(self, steps_per_epoch: int) -> ResolvedRun:
        """This run with its step counts from the data (train.epochs, selection.steps_fraction,
        optim.warmup_ratio); a ConfigError when they no longer fit together."""
        cfg = size_run(self.cfg, steps_per_epoch)
        problems = validate(cfg)
        if problems:
            raise ConfigError(problems, f"run sized from the data ({steps_per_epoch} optimizer steps per epoch)")
        return replace(self, cfg=cfg, sized=True)


def resolve_run(cfg: RunConfig, resume: bool = True) -> ResolvedRun:
    """The run ``cfg`` describes. ``resume``: resolve checkpoint.resume_from (a damaged or
    missing checkpoint is refused here); off for plans."""
    user = read_user_deepspeed_json(cfg.distributed.zero.config_file) if cfg.distributed.backend == "zero" else {}
    spec = resolve_backend(cfg.distributed, user)
    check_backend_supports(cfg, spec)
    paths = RunPaths.of(cfg)
    path = resolve_resume(cfg.checkpoint.resume_from, paths.checkpoints) if resume else None
    sized = not (cfg.train.epochs or cfg.selection.steps_fraction or cfg.optim.warmup_ratio)
    return ResolvedRun(cfg, spec, paths, path, MappingProxyType(dict(user)), sized)


def size_run(cfg: RunConfig, steps_per_epoch: int) -> RunConfig:
    """A copy of ``cfg`` with train.epochs / selection.steps_fraction / optim.warmup_ratio
    turned into step counts, once the data say how many optimizer steps one epoch is."""
    t, s, o = cfg.train, cfg.selection, cfg.optim
    max_steps = max(1, math.ceil(t.epochs * steps_per_epoch)) if t.epochs > 0 else t.max_steps
    steps = s.steps
    if s.steps_fraction > 0:
        unit = max(1, s.rounds)
        steps = max(unit, round(s.steps_fraction * max_steps / unit) * unit)
    warmup = round(o.warmup_ratio * max_steps) if o.warmup_ratio > 0 else o.warmup_steps
    return cfg.model_copy(
        update={
            "train": t.model_copy(update={"max_steps": max_steps, "epochs": 0.0}),
            "selection": s.model_copy(update={"steps": steps, "steps_fraction": 0.0}),
            "optim": o.model_copy(update={"warmup_steps": warmup, "warmup_ratio": 0.0}),
        }
    )
