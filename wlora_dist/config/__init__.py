"""The run configuration: one typed tree, loaded from YAML, validated at once.

One module per section (model, adapter, selection, optim, data, train, log, distributed,
checkpoint, memory / output), each field with its type, default, documentation and range
check together (pydantic, strict). ``loading`` reads YAML, the launcher's choices and
command-line overrides and reports *every* problem in one :class:`ConfigError`, each line
naming the field, the value and the fix.

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["train.max_steps=20"])
"""

from wlora_dist.config.adapter import AdapterConfig
from wlora_dist.config.checkpoint import CheckpointConfig
from wlora_dist.config.data import DataConfig
from wlora_dist.config.distributed import DistributedConfig, FSDPConfig, ZeROConfig
from wlora_dist.config.fields import FUSED_LINEARS, LLAMA_LINEARS
from wlora_dist.config.loading import ConfigError, config_from_dict, describe, load_config, set_dotted
from wlora_dist.config.log import LogConfig
from wlora_dist.config.memory import MemoryConfig, OutputConfig
from wlora_dist.config.model import ModelConfig
from wlora_dist.config.optim import OptimConfig
from wlora_dist.config.run import RunConfig, validate
from wlora_dist.config.selection import PRESETS, SelectionConfig, kept_count
from wlora_dist.config.train import TrainConfig

__all__ = [
    "FUSED_LINEARS",
    "LLAMA_LINEARS",
    "PRESETS",
    "AdapterConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "FSDPConfig",
    "LogConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "RunConfig",
    "SelectionConfig",
    "TrainConfig",
    "ZeROConfig",
    "config_from_dict",
    "describe",
    "kept_count",
    "load_config",
    "set_dotted",
    "validate",
]
