"""log.*: the console, the log file and the trackers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator

from wlora_dist.config.fields import Section, _to_list, at_least, field

Tracker = Literal["tensorboard", "jsonl", "wandb", "mlflow"]


class LogConfig(Section):
    every: Annotated[int, at_least(1)] = field(10, "Write a plain log line and tracker values every N optimizer steps.")
    trackers: Annotated[list[Tracker], BeforeValidator(_to_list)] = field(
        ["jsonl", "tensorboard"],
        "Trackers written by rank 0 (accelerate's tracker classes): jsonl and tensorboard under <output.dir>/logs; "
        "wandb (Weights & Biases; WANDB_MODE=offline works without an account) and mlflow (MLFLOW_TRACKING_URI, "
        "else an SQLite store in <output.dir>/logs/mlflow.db) need `pip install 'wlora-dist[trackers]'`.",
    )
    project: str = field("wlora_dist", "W&B project / MLflow experiment the run is logged under.")
    run_name: str = field("", "Name of the run in W&B / MLflow; empty = the output folder's name.")
    progress_bar: bool = field(True, "tqdm progress bar on rank 0.")
