"""What a user watches: a tqdm bar and plain log lines on rank 0, and accelerate trackers
(TensorBoard, a JSONL file any tool can read, Weights & Biases, MLflow).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker
from tqdm.auto import tqdm

from wlora_dist.config import LogConfig, RunConfig
from wlora_dist.noise import silence_known_noise

log = logging.getLogger("wlora_dist")


class TqdmLineHandler(logging.StreamHandler):
    """Log lines written through tqdm.write: a progress bar on the terminal is cleared and
    redrawn below the line instead of the line being glued to the bar's tail. Made for
    stderr, it writes to the sys.stderr of the moment, not the one of setup: a program that
    runs the trainer inside itself (a notebook, a test runner) may have swapped it since."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.follows_stderr = stream is None or stream is sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr if self.follows_stderr else self.stream)
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
    third_party_bars(is_main and sys.stderr.isatty())


def third_party_bars(show: bool) -> None:
    """datasets' (tokenising, map) and transformers' ("Loading weights") progress bars on
    rank 0 at a terminal only: in a log file each is one line of \r-joined updates, and on
    every rank they repeat once per process."""
    import datasets
    import transformers

    if show:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


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


def _run_id(log_dir: Path, tracker: str, resuming: bool) -> str | None:
    """The W&B / MLflow run a resumed run continues (its id is kept in logs/)."""
    path = log_dir / f"{tracker}_run_id"
    return path.read_text().strip() if resuming and path.is_file() else None


def mlflow_local_uri(log_dir: Path) -> str:
    """Where MLflow writes without MLFLOW_TRACKING_URI: an SQLite file in logs/
    (`mlflow ui --backend-store-uri <this>` shows it)."""
    return f"sqlite:///{(log_dir / 'mlflow.db').resolve()}"


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_tracker(name: str, cfg: LogConfig, log_dir: Path, run_config: dict, resuming: bool) -> GeneralTracker:
    """One started accelerate tracker, its run configuration stored. ``resuming``: a
    resumed run appends to the same JSONL file and continues the same W&B / MLflow run."""
    run_name = cfg.run_name or log_dir.parent.name
    if name == "jsonl":
        jsonl = JSONLTracker("run", log_dir)
        jsonl.store_init_configuration(run_config)
        return jsonl
    if name in ("wandb", "mlflow"):
        # accelerate's W&B / MLflow trackers log through its MultiProcessAdapter, which
        # refuses to run before accelerate's state exists. PartialState adopts the process
        # group already set up (no collective, nothing initialised a second time).
        from accelerate import PartialState

        PartialState()
    if name == "tensorboard":
        tracker: GeneralTracker = TensorBoardTracker("tensorboard", log_dir)
    elif name == "wandb":
        from accelerate.tracking import WandBTracker

        run_id = _run_id(log_dir, "wandb", resuming)
        (log_dir / "wandb").mkdir(parents=True, exist_ok=True)
        tracker = WandBTracker(
            cfg.project, name=run_name, dir=str(log_dir), id=run_id, resume="allow", config=run_config
        )
    elif name == "mlflow":
        import mlflow
        from accelerate.tracking import MLflowTracker

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow's own local store (its plain-file store is in maintenance mode and refuses);
            # its artifacts beside it, not in ./mlruns of whatever folder the run started in.
            mlflow.set_tracking_uri(mlflow_local_uri(log_dir))
            if mlflow.get_experiment_by_name(cfg.project) is None:
                mlflow.create_experiment(cfg.project, (log_dir / "mlflow-artifacts").resolve().as_uri())
        run_id = _run_id(log_dir, "mlflow", resuming)
        tracker = MLflowTracker(cfg.project, run_id=run_id, run_name=run_name)
    else:
        raise ValueError(f"unknown tracker {name!r}")
    tracker.main_process_only = False  # only rank 0 makes trackers; no accelerate state needed
    tracker.start()
    if name == "wandb":
        (log_dir / "wandb_run_id").write_text(tracker.run.id)
    elif name == "mlflow":
        (log_dir / "mlflow_run_id").write_text(tracker.active_run.info.run_id)
        if run_id is None:  # parameters are written once; a resumed run keeps them
            tracker.store_init_configuration(_flat(run_config))
    return tracker


class RunLogger:
    """Rank 0's bar, log lines and trackers; a silent stand-in on other ranks."""

    def __init__(
        self,
        cfg: LogConfig,
        log_dir: Path,
        total_steps: int,
        is_main: bool,
        run_config: dict,
        resuming: bool = False,
        steps_per_epoch: int | None = None,
        start_step: int = 0,
    ) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.total_steps, self.steps_per_epoch, self.start_step = total_steps, steps_per_epoch, start_step
        self.started = time.monotonic()  # this process's first step: elapsed and ETA count from here
        self.trackers: list[GeneralTracker] = []
        self.bar = None
        if not is_main:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = [make_tracker(name, cfg, log_dir, run_config, resuming) for name in cfg.trackers]
        if cfg.progress_bar:
            # disable=None: no bar when stderr is not a terminal (CI logs, SLURM files); log lines remain.
            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, file=sys.stderr, disable=None)

    @classmethod
    def for_run(
        cls, cfg: RunConfig, log_dir: Path, is_main: bool, steps_per_epoch: int | None, start_step: int
    ) -> RunLogger:
        """The logger of an accepted run (a resumed one from ``start_step``)."""
        args = (cfg.log, log_dir, cfg.train.max_steps, is_main, cfg.to_dict())
        return cls(*args, start_step > 0, steps_per_epoch, start_step)

    def step(self, optimizer_step: int, metrics: dict[str, float], postfix: dict[str, str]) -> None:
        """Advance the bar; on every ``log.every`` steps also log and track ``metrics``."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)
        layout_event = "prune_seconds" in metrics or "round_seconds" in metrics  # always in the record
        if optimizer_step % self.cfg.every == 0 or optimizer_step == 1 or layout_event:
            self.track(optimizer_step, metrics)
            log.info("%s | %s", self.progress(optimizer_step), " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def progress(self, optimizer_step: int) -> str:
        """'step 40/120 | epoch 1.33 | elapsed 0:02:10 | eta 0:04:20': what a log file (no
        terminal, no bar: SLURM) shows of the run's progress. The ETA is this process's
        pace so far times the steps left; the epoch is there when the run is sized by data."""
        words = [f"step {optimizer_step}/{self.total_steps}"]
        if self.steps_per_epoch:
            words.append(f"epoch {optimizer_step / self.steps_per_epoch:.2f}")
        elapsed = time.monotonic() - self.started
        done = optimizer_step - self.start_step
        eta = elapsed / done * (self.total_steps - optimizer_step) if done > 0 else 0.0
        words += [f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"]
        return " | ".join(words)

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

    def artifacts(self, adapter_dir: Path, report_dir: Path, optimizer_step: int) -> None:
        """The run's results in its trackers: the adapter folder and the selection reports
        (JSON, heat maps) as artifacts in MLflow and W&B, the heat maps as images in W&B
        and TensorBoard. A tracker that fails here is logged, not fatal (the files exist)."""
        if not self.is_main:
            return
        images = sorted(report_dir.glob("gates-*.png"))
        for t in self.trackers:
            try:
                _log_artifacts(t, adapter_dir, report_dir, images, optimizer_step)
            except Exception as e:  # a tracker's upload must not fail a finished run
                log.warning("%s: could not log the adapter / reports as artifacts (%s)", t.name, e)

    def close(self, outcome: str = "finished") -> None:
        """End the trackers' runs as the run ended: ``finished``; ``stopped`` (a signal,
        resumable: MLflow KILLED, W&B preempted); ``failed`` (MLflow FAILED, W&B exit 1)."""
        if self.bar is not None:
            self.bar.close()
        for t in self.trackers:
            if outcome == "finished":
                t.finish()
            elif t.name == "mlflow":
                import mlflow

                mlflow.end_run(status="KILLED" if outcome == "stopped" else "FAILED")
            elif t.name == "wandb":
                if outcome == "stopped":
                    t.run.mark_preempting()
                t.run.finish(exit_code=0 if outcome == "stopped" else 1)
            else:
                t.finish()


def _log_artifacts(t: GeneralTracker, adapter_dir: Path, report_dir: Path, images: list[Path], step: int) -> None:
    if t.name == "mlflow":
        import mlflow

        mlflow.log_artifacts(str(adapter_dir), "adapter")
        mlflow.log_artifacts(str(report_dir), "report")
    elif t.name == "wandb":
        import wandb

        run = t.run
        for folder, kind in ((adapter_dir, "model"), (report_dir, "selection-report")):
            artifact = wandb.Artifact(f"{folder.name}-{run.id}", type=kind)
            artifact.add_dir(str(folder))
            run.log_artifact(artifact)
        if images:  # with the last step's row
            run.log({f"selection/{p.stem}": wandb.Image(str(p)) for p in images})
    elif t.name == "tensorboard":
        import matplotlib.image

        for p in images:
            pixels = matplotlib.image.imread(str(p))[..., :3]  # RGBA floats in [0, 1] -> RGB
            t.writer.add_image(f"selection/{p.stem}", pixels, step, dataformats="HWC")
        t.writer.flush()


SELECTION_METRICS = (
    "gate_grad_norm",
    "gates_nonzero",
    "kept",
    "prune_seconds",
    "round_seconds",
    "prune_layout_seconds",
    "round_layout_seconds",
)


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


def _clock(seconds: float) -> str:
    """h:mm:ss."""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _fmt(v: float) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
