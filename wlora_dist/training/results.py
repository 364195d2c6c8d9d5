"""What a run returns, and the error that ends it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wlora_dist.errors import UserError


class TrainingError(UserError):
    """The run cannot go on (NaN loss, an adapter in the way)."""


@dataclass
class TrainResult:
    adapter_dir: Path
    report_dir: Path
    kept: list[str]
    history: list[dict] = field(default_factory=list)  # this rank's metrics of every step
    eval_loss: float | None = None
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # "before"/"after" prune
    stopped_at: int | None = None  # the step a stop signal ended the run at (checkpoint saved)
    checkpoint: Path | None = None
