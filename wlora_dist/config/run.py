"""The run configuration: its sections and what they get wrong together. (The step counts
a run sized by epochs gets once the data are known: wlora_dist/resolved.py.)"""

from __future__ import annotations

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
    d = cfg.data
    if d.weights and (len(d.weights) != len(d.train) or any(w <= 0 for w in d.weights)):
        p.append(
            f"data.weights: {d.weights} must be one number > 0 per data.train source ({len(d.train)} given); "
            "or leave it empty for every row once"
        )
    p += cfg.selection.problems() + cfg.distributed.zero.problems()
    s, o, t = cfg.selection, cfg.optim, cfg.train
    sized_later = t.epochs > 0  # max_steps follows from the data (size_run)
    if s.method != "none" and s.steps > t.max_steps and not sized_later and not s.steps_fraction:
        p.append(f"selection.steps: {s.steps} exceeds train.max_steps={t.max_steps}; lower it or raise max_steps")
    if o.warmup_steps > t.max_steps and not sized_later and not o.warmup_ratio:
        p.append(f"optim.warmup_steps: {o.warmup_steps} must be in [0, train.max_steps={t.max_steps}]")
    return p
