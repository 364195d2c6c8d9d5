"""meta.json of a checkpoint (``CheckpointMeta``), and what a resuming run must share with
the checkpoint it resumes (``run_identity``, ``check_compatible``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from wlora_dist.checkpoint.folders import CheckpointError
from wlora_dist.config import RunConfig
from wlora_dist.method.weight_lora import WeightLoRA


@dataclass
class CheckpointMeta:
    """meta.json of a checkpoint: what training, resume and ``wlora-dist export`` share.

    Versioned by ``FORMAT`` (written as "format"); a checkpoint of another format is
    refused with a clear message rather than misread."""

    step: int  # the optimizer step it was written after
    pruned: bool  # after the prune event (the gates frozen)
    kept: list[str]  # adapter names present, in site order
    ranks: dict[str, int]  # LoRA rank of each kept adapter (WeightLoRA+ doubles them)
    rounds_log: list[dict[str, Any]]  # WeightLoRA+ rounds done so far
    rows_consumed: int  # training rows of the global batch consumed (data position)
    world_size: int
    backend: str  # BackendSpec.name of the run that wrote it
    identity: dict[str, Any]  # what a resuming run must share with it (run_identity)
    adapter_config: dict[str, Any]  # the peft LoraConfig of the kept adapters, as JSON
    time: float = 0.0  # wall clock at writing

    FORMAT: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> CheckpointMeta:
        if data.get("format") != cls.FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {data.get('format')!r}, this version reads {cls.FORMAT}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n != "time"]
        if missing:
            raise CheckpointError(f"{path}: meta.json lacks {missing}; the checkpoint is damaged")
        return cls(**{n: data[n] for n in names if n in data})

    @property
    def sites(self) -> list[str]:
        """Every adapter site of the run (index i <-> gate w[i])."""
        return list(self.identity["sites"])


def read_meta(path: Path) -> CheckpointMeta:
    try:
        data = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read meta.json ({e}); the checkpoint is damaged") from None
    return CheckpointMeta.from_dict(data, path)


def check_compatible(meta: CheckpointMeta, identity: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another model / adapter layout / selection, naming the field."""
    problems = []
    for key, ours in identity.items():
        theirs = meta.identity.get(key)
        if theirs != ours:
            shown_t = theirs if len(repr(theirs)) < 120 else f"{len(theirs)} entries"
            shown_o = ours if len(repr(ours)) < 120 else f"{len(ours)} entries"
            problems.append(f"{key}: checkpoint {shown_t!r}, this run {shown_o!r}")
    if problems:
        raise CheckpointError(
            f"{path} was written by a different run:\n  - "
            + "\n  - ".join(problems)
            + "\nresume with the config it was written with (saved as config.json next to meta.json) "
            "or use a new output.dir / checkpoint.dir"
        )


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


def rows_per_step(cfg: RunConfig, world_size: int) -> int:
    """Training rows one optimizer step consumes over all ranks (the data position's unit;
    the ranks sharing a sequence read the same rows)."""
    data_ranks = world_size // cfg.distributed.sequence_parallel
    return cfg.train.grad_accum_steps * cfg.train.micro_batch_size * data_ranks
