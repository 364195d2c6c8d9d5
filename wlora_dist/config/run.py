"""The run configuration: its sections, what they get wrong together, and the step counts
a run sized by epochs gets once the data are known."""

from __future__ import annotations

import math
from typing import Any

from wlora_dist.config.adapter import AdapterConfig
from wlora_dist.config.checkpoint import CheckpointConfig
from wlora_dist.config.data import DataConfig
from wlora_dist.config.distributed import DistributedConfig
from wlora_dist.config.fields import Section, field
from wlora_dist.config.log import LogConfig
from wlora_dist.config.memory import MemoryConfig, OutputConfig
from wlora_dist.config.model import ModelConfig
from wlora_dist.config.optim import OptimConfig
from wlora_dist.config.selection import SelectionConfig
from wlora_dist.config.train import TrainConfig


class RunConfig(Section):
    model: ModelConfig = field(ModelConfig, "The frozen base model.")
    adapter: AdapterConfig = field(AdapterConfig, "The LoRA adapters.")
    selection: SelectionConfig = field(SelectionConfig, "WeightLoRA's selection phase.")
    optim: OptimConfig = field(OptimConfig, "AdamW and its schedule.")
    data: DataConfig = field(DataConfig, "Training and eval data.")
    train: TrainConfig = field(TrainConfig, "Run length, batches, precision.")
    log: LogConfig = field(LogConfig, "Console, logs and trackers.")
    distributed: DistributedConfig = field(DistributedConfig, "The distributed backend.")
    checkpoint: CheckpointConfig = field(CheckpointConfig, "Checkpoints and resume.")
    memory: MemoryConfig = field(MemoryConfig, "The memory budget.")
    output: OutputConfig = field(OutputConfig, "Where the run writes.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def validate(cfg: RunConfig) -> list[str]:
    """What the fields get wrong together (each field's own range is checked as it loads)."""
    p: list[str] = []
    if not cfg.model.path:
        p.append("model.path: empty; set it to an HF model folder or hub id")
    if not cfg.data.train:
        p.append("data.train: empty; give a data file, dataset folder or hub id")
    p += cfg.selection.problems() + cfg.distributed.zero.problems()
    s, o, t = cfg.selection, cfg.optim, cfg.train
    sized_later = t.epochs > 0  # max_steps follows from the data (size_run)
    if s.method != "none" and s.steps > t.max_steps and not sized_later and not s.steps_fraction:
        p.append(f"selection.steps: {s.steps} exceeds train.max_steps={t.max_steps}; lower it or raise max_steps")
    if o.warmup_steps > t.max_steps and not sized_later and not o.warmup_ratio:
        p.append(f"optim.warmup_steps: {o.warmup_steps} must be in [0, train.max_steps={t.max_steps}]")
    return p


def size_run(cfg: RunConfig, steps_per_epoch: int) -> list[str]:
    """Turn train.epochs / selection.steps_fraction / optim.warmup_ratio into step counts,
    once the data say how many optimizer steps one epoch is; return what no longer fits."""
    t, s, o = cfg.train, cfg.selection, cfg.optim
    if t.epochs > 0:
        t.max_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
    if s.steps_fraction > 0:
        unit = max(1, s.rounds)
        s.steps = max(unit, round(s.steps_fraction * t.max_steps / unit) * unit)
    if o.warmup_ratio > 0:
        o.warmup_steps = round(o.warmup_ratio * t.max_steps)
    t.epochs, s.steps_fraction, o.warmup_ratio = 0.0, 0.0, 0.0  # now counts: the checks below see them
    return validate(cfg)
