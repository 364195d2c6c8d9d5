"""What a run returns, and the errors that end it."""

from __future__ import annotations

import math
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


def check_finite(step: int, values: list[float], rank: int, trained_tokens: int) -> None:
    """A step's (this rank's loss, the mean loss over ranks, the gradient norm): a loss that
    is not finite on any rank stops the run, naming the rank and the likely cause, and so
    does a gradient norm that is not (the same on every rank). ``trained_tokens``: this
    rank's tokens with a label in the step."""
    local_f, mean_f, norm_f = values
    if not math.isfinite(local_f) and trained_tokens == 0:
        raise TrainingError(
            f"loss is {local_f} at optimizer step {step} on rank {rank}: its micro-batches hold "
            "no token to train on (every label masked), so the loss divides zero by zero; the data's rows with "
            "nothing to train are dropped when tokenised (data.max_untrained_share): check data.format and the "
            "template with `wlora-dist preview`"
        )
    for value, where in ((local_f, f"rank {rank}"), (mean_f, "another rank")):
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} at optimizer step {step} on {where}; "
                "lower optim.lr / selection.lr_w or check the data"
            )
    if not math.isfinite(norm_f):
        # The loss was finite but its backward overflowed: the step just taken wrote
        # non-finite adapters, so the run stops here (before any save or export of them).
        raise TrainingError(
            f"gradient norm is {norm_f} at optimizer step {step} (the loss, {mean_f:.4g}, was finite): the "
            "backward overflowed; resume from the last checkpoint with a lower optim.lr, optim.max_grad_norm "
            "> 0, or check the base model's weights"
        )
