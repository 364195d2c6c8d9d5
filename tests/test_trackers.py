"""Weights & Biases (offline) and MLflow (its local SQLite store) through accelerate's tracker
classes: namespaced metric values, the run configuration, and a resumed run continuing
the same run; the preflight's refusals."""

import pytest

from wlora_dist.config import ConfigError, LogConfig
from wlora_dist.training.preflight import check_trackers
from wlora_dist.training.tracking import RunLogger, mlflow_local_uri

from .helpers import wandb_records

RUN_CONFIG = {"model": {"path": "tiny/model"}, "selection": {"k": 4}}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _log(log_dir, steps, resuming):
    logger = RunLogger(LogConfig(trackers=["wandb", "mlflow"], every=1), log_dir, 4, True, RUN_CONFIG, resuming)
    for step, loss in steps:
        logger.step(step, {"loss": loss, "gate_grad_norm": 0.5 * step}, {})
    logger.track(steps[-1][0], {"eval_loss": 1.25})
    logger.close()


def test_wandb_offline_and_mlflow_file_store_record_the_run(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    log_dir = tmp_path / "run/logs"
    _log(log_dir, [(1, 3.0), (2, 2.5)], resuming=False)
    run_ids = {t: (log_dir / f"{t}_run_id").read_text() for t in ("wandb", "mlflow")}
    _log(log_dir, [(3, 2.0)], resuming=True)  # a resumed run: the same W&B and MLflow runs
    assert {t: (log_dir / f"{t}_run_id").read_text() for t in ("wandb", "mlflow")} == run_ids

    client = MlflowClient(tracking_uri=mlflow_local_uri(log_dir))
    run = client.get_run(run_ids["mlflow"])
    assert run.info.run_name == "run" and run.data.params["model.path"] == "tiny/model"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert run.data.metrics["selection/gate_grad_norm"] == 1.5 and run.data.metrics["eval/loss"] == 1.25

    # Offline, each process writes its own folder; both carry the run's id (`wandb sync` joins them).
    runs = sorted(p for p in (log_dir / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert len(runs) == 2 and all(p.name.endswith(run_ids["wandb"]) for p in runs)
    first, resumed = (wandb_records(p) for p in runs)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} | {"step": r["_step"]} for r in first["history"]]
    assert rows == [
        {"step": 1, "train/loss": 3.0, "selection/gate_grad_norm": 0.5},
        {"step": 2, "train/loss": 2.5, "selection/gate_grad_norm": 1.0, "eval/loss": 1.25},
    ]
    assert [r["train/loss"] for r in resumed["history"]] == [2.0]
    assert dict(first["config"])["model"] == {"path": "tiny/model"}


def test_trackers_are_checked_before_anything_loads(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(
        ConfigError, match=r"'mlflow' needs the mlflow-skinny package: pip install 'wlora-dist\[trackers\]'"
    ):
        check_trackers(["jsonl", "mlflow"])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    (tmp_path / "netrc").write_text("machine example.org login x password y\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match=r"no login for api.wandb.ai .*WANDB_MODE=offline"):
        check_trackers(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(["wandb"])


def _results(tmp_path):
    """An adapter folder and a report folder with a heat map, as a finished run leaves them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapter, report = tmp_path / "run/adapter", tmp_path / "run/report"
    adapter.mkdir(parents=True)
    report.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (report / "selection-final.json").write_text("{}")
    fig = plt.figure(figsize=(1, 1))
    plt.imshow([[0.0, 1.0], [1.0, 0.0]])
    fig.savefig(report / "gates-prune.png")
    plt.close(fig)
    return adapter, report


@pytest.mark.parametrize(
    ("outcome", "mlflow_status", "wandb_exit"),
    [("finished", "FINISHED", 0), ("stopped", "KILLED", 0), ("failed", "FAILED", 1)],
)
def test_trackers_hold_the_results_and_how_the_run_ended(
    tmp_path, offline, outcome, mlflow_status, wandb_exit, monkeypatch
):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "run/logs"
    adapter, report = _results(tmp_path)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts must not land in ./mlruns of the start folder
    logger = RunLogger(LogConfig(trackers=["wandb", "mlflow", "tensorboard"], every=1), log_dir, 2, True, RUN_CONFIG)
    logger.step(1, {"loss": 3.0, "gates_nonzero": 14}, {})
    logger.step(2, {"loss": 2.0, "prune_seconds": 0.1, "kept": 4, "gates_nonzero": 4}, {})
    if outcome == "finished":
        logger.artifacts(adapter, report, 2)
    logger.close(outcome)

    client = MlflowClient(tracking_uri=mlflow_local_uri(log_dir))
    run = client.get_run((log_dir / "mlflow_run_id").read_text())
    assert run.info.status == mlflow_status
    assert run.data.metrics["selection/gates_nonzero"] == 4  # the state after the prune event, not a stale 14
    (folder,) = [p for p in (log_dir / "wandb").iterdir() if p.name.startswith("offline-run-")]
    records = wandb_records(folder)
    assert records["exit"] == [wandb_exit] and bool(records["preempting"]) == (outcome == "stopped")
    if outcome != "finished":
        return
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    listed |= {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert listed == {"adapter/adapter_config.json", "report/selection-final.json", "report/gates-prune.png"}
    assert run.info.artifact_uri.startswith((log_dir / "mlflow-artifacts").resolve().as_uri())
    assert (log_dir / "mlflow-artifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert sorted(t for _, t in records["artifacts"]) == ["model", "selection-report"]
    assert any(k.startswith("selection/gates-prune/") for row in records["history"] for k in row), records["history"]
    (events,) = (log_dir / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert "selection/gates-prune" in acc.Tags()["images"]
