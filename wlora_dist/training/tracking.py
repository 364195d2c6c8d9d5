"""What a user watches: a tqdm bar and plain log lines on rank 0, and accelerate trackers
(TensorBoard, and a JSONL file any tool can read) under <output.dir>/logs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker
from tqdm.auto import tqdm

from wlora_dist.config import LogConfig
from wlora_dist.noise import silence_known_noise

log = logging.getLogger("wlora_dist")


class TqdmLineHandler(logging.StreamHandler):
    """Log lines written through tqdm.write: a progress bar on the terminal is cleared and
    redrawn below the line instead of the line being glued to the bar's tail."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise
            self.handleError(record)


def setup_logging(is_main: bool) -> None:
    """Plain lines on rank 0; warnings and errors only on the other ranks."""
    silence_known_noise()
    handler = TqdmLineHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False


class JSONLTracker(GeneralTracker):
    """accelerate tracker writing one JSON object per logged step to metrics.jsonl."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = False  # only rank 0 creates trackers at all

    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)

    @property
    def tracker(self) -> Any:
        return self.file

    def store_init_configuration(self, values: dict) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()


class RunLogger:
    """Rank 0's bar, log lines and trackers; a silent stand-in on other ranks."""

    def __init__(self, cfg: LogConfig, log_dir: Path, total_steps: int, is_main: bool, run_config: dict) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.trackers: list[GeneralTracker] = []
        self.bar = None
        if not is_main:
            return
        for name in cfg.trackers:
            if name == "jsonl":
                self.trackers.append(JSONLTracker("run", log_dir))
            else:
                tb = TensorBoardTracker("tensorboard", log_dir)
                tb.main_process_only = False
                tb.start()
                self.trackers.append(tb)
        for t in self.trackers:
            if isinstance(t, JSONLTracker):
                t.store_init_configuration(run_config)
        if cfg.progress_bar:
            # disable=None: no bar when stderr is not a terminal (CI logs, SLURM files); log lines remain.
            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, file=sys.stderr, disable=None)

    def step(self, optimizer_step: int, metrics: dict[str, float], postfix: dict[str, str]) -> None:
        """Advance the bar; on every ``log.every`` steps also log and track ``metrics``."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)
        if optimizer_step % self.cfg.every == 0 or optimizer_step == 1:
            self.track(optimizer_step, metrics)
            log.info("step %d | %s", optimizer_step, " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def track(self, optimizer_step: int, metrics: dict[str, float]) -> None:
        """JSONL keeps the flat names (scripts read them); the other trackers get
        namespaced tags: train/..., eval/..., selection/..."""
        if self.is_main:
            tagged = namespaced(metrics)
            for t in self.trackers:
                t.log(metrics if isinstance(t, JSONLTracker) else tagged, step=optimizer_step)

    def info(self, msg: str, *args: Any) -> None:
        if self.bar is not None:
            self.bar.clear()
        log.info(msg, *args)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for t in self.trackers:
            t.finish()


SELECTION_METRICS = ("gate_grad_norm", "gates_nonzero", "kept", "prune_seconds", "round_seconds")


def namespaced(metrics: dict[str, float]) -> dict[str, float]:
    """eval_loss -> eval/loss, gate_grad_norm -> selection/gate_grad_norm, loss -> train/loss."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("eval_"):
            out[f"eval/{k.removeprefix('eval_')}"] = v
        elif k in SELECTION_METRICS:
            out[f"selection/{k}"] = v
        else:
            out[f"train/{k}"] = v
    return out


def _fmt(v: float) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
