"""The run's adapter layout as the loop changes it: a WeightLoRA+ round or the prune event
(the selector changes the adapters, the backend rebuilds what it holds), the re-plan of
activation checkpointing after the prune (``memory.replan_at_prune``), the probe loss
around each change, the bytes each rank holds before and after, and the record of every
change (the report, the checkpoint's rounds, the final report's figures)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wlora_dist.config import RunConfig
from wlora_dist.distributed.base import Backend
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.method.selector import LayoutChange, LayoutEvent, Selector
from wlora_dist.resolved import RunPaths
from wlora_dist.training import replan
from wlora_dist.training.report import report_layout_change, round_record
from wlora_dist.training.tracking import RunLogger


@dataclass
class LayoutRecord:
    """What the run's layout changes did, for the logs, the checkpoints and the final report."""

    events: list[LayoutEvent] = field(default_factory=list)  # rounds, the prune event, a resume
    rounds_log: list[dict[str, Any]] = field(default_factory=list)  # WeightLoRA+: kept set and rank after each
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # this rank's bytes before / after the prune
    replanned: replan.Replan | None = None  # memory.replan_at_prune's switch, if it made one
    prune_seconds: float | None = None


class Layout:
    """Carries out the layout changes the selector schedules, and keeps their record."""

    def __init__(
        self, cfg: RunConfig, env: DistEnv, spec: BackendSpec, paths: RunPaths, selector: Selector, backend: Backend
    ) -> None:
        self.cfg, self.env, self.spec, self.paths = cfg, env, spec, paths
        self.selector, self.backend = selector, backend
        self.record = LayoutRecord()

    def record_memory(self, step: int) -> None:
        """This rank's trainable / optimizer bytes at the last selection step and the first
        after the prune event (the final report's before / after)."""
        sel = self.cfg.selection
        if step in (sel.steps, sel.steps + 1) and sel.method != "none":
            self.record.memory["before" if step == sel.steps else "after"] = self.backend.memory_report()

    def change(self, change: LayoutChange, probe_loss: Callable[[], float], logger: RunLogger) -> LayoutEvent:
        """A WeightLoRA+ round or the prune event: the selector changes the adapters; here
        the probe loss around it (continuity), the re-plan, the report and the log."""
        t0 = time.perf_counter()
        before = probe_loss()
        t1 = time.perf_counter()
        event = self.selector.apply(change, self.backend)
        if change.kind == "prune" and self.cfg.memory.replan_at_prune:
            self.replan(logger.info)
        event.layout_seconds = time.perf_counter() - t1
        event.probe_losses = (before, probe_loss())  # equal unless re-initialised
        event.seconds = time.perf_counter() - t0
        self.record.events.append(event)
        if change.round_:
            self.record.rounds_log.append(round_record(event))
        if change.kind == "prune":
            self.record.prune_seconds = event.seconds
        out = self.paths.report if self.env.is_main and self.cfg.output.reports else None
        report_layout_change(event, self.selector.wl, out, self.record.rounds_log, logger)
        return event

    def resumed(self, event: LayoutEvent, rounds_log: list[dict[str, Any]], info: Callable[..., None]) -> None:
        """A resume rebuilt the checkpoint's layout: recorded, and re-planned as the
        interrupted run did at its prune event."""
        self.record.events.append(event)
        self.record.rounds_log = list(rounds_log)
        if self.selector.pruned and self.cfg.memory.replan_at_prune:
            self.replan(info)

    def replan(self, info: Callable[..., None]) -> None:
        wl = self.selector.wl
        if not self.cfg.model.gradient_checkpointing:
            return
        kept = [(s.layer, s.kind) for s in wl.kept_sites() if s.layer is not None]
        inp = replan.plan_input(self.cfg, self.env, self.spec, wl.base_model, kept)
        self.record.replanned = replan.replan_at_prune(inp, wl.base_model, info)
