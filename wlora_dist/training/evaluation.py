"""Losses measured without training: the probe loss around a layout change, and eval."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from wlora_dist.data.rows import IGNORE
from wlora_dist.distributed.env import all_reduce_sum_
from wlora_dist.training.inputs import StepInputs

Batch = dict[str, torch.Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager]


@torch.no_grad()
def probe_loss(module: nn.Module, batch: Batch, autocast: Autocast, scale: Callable = lambda x: x) -> float:
    """Loss of ``batch`` (model inputs) with dropout off (the same batch before and after a
    layout change); ``scale``: StepInputs.loss (a sequence chunk's loss times N)."""
    module.eval()
    with autocast():
        loss = scale(module(**batch).loss)
    module.train()
    return float(loss)


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[Batch], limit: int, inputs: StepInputs, autocast: Autocast) -> dict:
    """Token-weighted loss over every rank's first ``limit`` batches; perplexity. ``inputs``:
    how a batch becomes this rank's model inputs (its chunk under sequence parallelism,
    whose loss N times its share is: every rank of a group then adds the same weight)."""
    module.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=inputs.device)  # (loss * tokens, tokens)
    for i, batch in enumerate(batches):
        if i >= limit:
            break
        n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the host copy: no device sync
        with autocast():
            loss = inputs.loss(module(**inputs(batch)).loss)
        sums[0] += loss.detach().double() * n
        sums[1] += n
    all_reduce_sum_(sums)
    module.train()
    eval_loss = float(sums[0] / sums[1].clamp(min=1))
    return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}
