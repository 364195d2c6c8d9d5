"""checkpoint.*: when checkpoints are written, where, how many kept, and resuming."""

from __future__ import annotations

from typing import Annotated

from wlora_dist.config.fields import Float, Section, at_least, field


class CheckpointConfig(Section):
    every: Annotated[int, at_least(0, "0 = only on a stop signal")] = field(
        0, "Save a checkpoint every N optimizer steps (0 = no step interval)."
    )
    every_minutes: Annotated[Float, at_least(0, "0 = no time interval")] = field(
        0.0,
        "Also save when this many minutes have passed since the last save (0 = no time interval): what "
        "preemptible clusters need. A stop signal (SIGTERM, SIGUSR1, Ctrl-C) always saves.",
    )
    keep_last: Annotated[int, at_least(1)] = field(
        2, "Checkpoints kept (the newest); older ones are deleted once a new one is complete."
    )
    dir: str = field("", "Where checkpoints go; empty = <output.dir>/checkpoints.")
    resume_from: str = field(
        "",
        "'' = start fresh; 'auto' = the newest checkpoint in checkpoint.dir if there is one (for requeued jobs); "
        "'latest' = the newest (an error if none); or a checkpoint folder (step-NNNNNNNN).",
    )
    save_on_signal: bool = field(
        True, "On SIGTERM / SIGUSR1 / Ctrl-C: finish the step, save a checkpoint, exit 0 (Ctrl-C twice: at once)."
    )
