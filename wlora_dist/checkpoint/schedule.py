"""When a run saves a checkpoint, and how it stops on a signal: every ``checkpoint.every``
steps, every ``checkpoint.every_minutes``, and on SIGTERM / SIGUSR1 / Ctrl-C; every rank
reaches the same decision through one small all-reduce."""

from __future__ import annotations

import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from wlora_dist.config import CheckpointConfig
from wlora_dist.distributed.env import all_reduce_max_


class StopOnSignal:
    """SIGTERM / SIGUSR1 (what SLURM and torchrun send before preemption) and SIGINT (Ctrl-C)
    only set a flag; the trainer checks it between optimizer steps on every rank (``poll``,
    one tiny all-reduce, so a signal that reached one rank stops all), saves a checkpoint and
    exits. A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.at: float | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step
        self.received = signum
        self.at = time.time()

    def poll(self, device: torch.device, save_due: bool = False) -> tuple[bool, bool]:
        """(stop requested on any rank, a time-based save due on any rank): every rank gets
        the same answer, so every rank takes part in the same collective save."""
        flags = torch.tensor([float(self.received is not None), float(save_due)], device=device)
        if dist.is_available() and dist.is_initialized():
            all_reduce_max_(flags)
        stop, due = flags.tolist()
        return stop > 0, due > 0

    def requested(self, device: torch.device) -> bool:
        return self.poll(device)[0]


class SaveSchedule:
    """When a run saves a checkpoint: every ``checkpoint.every`` steps, every
    ``checkpoint.every_minutes`` since the last save, and on a stop signal. Every rank gets
    the same answer (one all-reduce), so every rank takes part in the same save."""

    def __init__(self, cfg: CheckpointConfig, max_steps: int) -> None:
        self.cfg, self.max_steps = cfg, max_steps
        self.stopper = StopOnSignal()
        self.last_save = time.monotonic()

    def check(self, optimizer_step: int, device: torch.device) -> tuple[bool, bool]:
        """(stop now, save now) after ``optimizer_step``; the last step saves the adapter instead."""
        minutes, every = self.cfg.every_minutes, self.cfg.every
        due = bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes
        stop, due = self.stopper.poll(device, due)
        periodic = (due or (every > 0 and optimizer_step % every == 0)) and optimizer_step < self.max_steps
        return stop, stop or periodic

    def saved(self) -> None:
        self.last_save = time.monotonic()
