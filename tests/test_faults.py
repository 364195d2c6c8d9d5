"""Faults an operator meets, in one process: time-based checkpoints, Ctrl-C, the permissions
of what a run writes, and a fresh run over an earlier run's checkpoints."""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import pytest
import torch

from wlora_dist.checkpoint.folders import list_checkpoints
from wlora_dist.checkpoint.peft import write_peft_adapter
from wlora_dist.checkpoint.schedule import StopOnSignal
from wlora_dist.config import ConfigError, config_from_dict

from .conftest import tiny_config_dict
from .helpers import train_in_process


@pytest.mark.inprocess
def test_every_minutes_saves_on_time_and_every_rank_agrees(tiny_dir, tmp_path):
    # A tiny interval: a save after every step but the last (which writes the adapter).
    _, result = train_in_process(
        tiny_dir, tmp_path, checkpoint={"every_minutes": 1e-9, "keep_last": 50}, train={"max_steps": 5}
    )
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path / "run/checkpoints")]
    assert steps == [1, 2, 3, 4] and result.stopped_at is None
    # A long interval: none.
    _, _ = train_in_process(tiny_dir, tmp_path / "b", checkpoint={"every_minutes": 60.0}, train={"max_steps": 5})
    assert list_checkpoints(tmp_path / "b/run/checkpoints") == []


def test_every_minutes_must_not_be_negative(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint.every_minutes: -1.0 must be >= 0"):
        config_from_dict(tiny_config_dict(tiny_dir, tmp_path, checkpoint={"every_minutes": -1.0}))


def test_ctrl_c_requests_a_stop_and_twice_stops_at_once():
    stopper = StopOnSignal()
    stopper.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stopper.poll(torch.device("cpu")) == (True, False) and stopper.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        stopper.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.inprocess
def test_ctrl_c_during_a_run_saves_a_checkpoint(tiny_dir, tmp_path):
    from wlora_dist.distributed.env import init_distributed
    from wlora_dist.training.callbacks import Callback
    from wlora_dist.training.trainer import Trainer

    class CtrlCAtStep2(Callback):
        def on_optimizer_step_end(self, trainer, optimizer_step):
            if optimizer_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run"))
    trainer = Trainer(cfg, init_distributed(), [CtrlCAtStep2()], handle_signals=True)
    trainer.setup()
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert result.stopped_at == 2 and result.checkpoint is not None
    assert json.loads((result.checkpoint / "meta.json").read_text())["step"] == 2
    assert not (tmp_path / "run/adapter").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_folders_follow_the_users_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        from peft import LoraConfig

        out = write_peft_adapter({"x": torch.zeros(2)}, LoraConfig(r=2, target_modules=["q"]), tmp_path / "adapter")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tiny_dir, tmp_path_factory):
    """step-00000001 and step-00000002 of a 3-step, 1-process run (the prune after step 1)."""
    tmp = tmp_path_factory.mktemp("two")
    train_in_process(
        tiny_dir, tmp, checkpoint={"every": 1, "keep_last": 5}, train={"max_steps": 3}, selection={"steps": 1}
    )
    return tmp / "run/checkpoints"


def _copy(root, tmp_path):
    import shutil

    out = tmp_path / "checkpoints"
    shutil.copytree(root, out)
    return out


def _shard(ckpt):
    return sorted((ckpt / "state").glob("*.safetensors"))[0]


@pytest.mark.inprocess
def test_checkpoints_record_every_file_and_verify(two_checkpoints):
    from wlora_dist.checkpoint.folders import verify

    meta = json.loads((two_checkpoints / "step-00000002/meta.json").read_text())
    files = meta["files"]
    assert (
        "config.json" in files and any(k.startswith("state/") for k in files) and "rng/rank-00000.safetensors" in files
    )
    assert all(verify(p) is None for p in list_checkpoints(two_checkpoints))


@pytest.mark.inprocess
def test_a_truncated_shard_is_skipped_by_auto_with_a_warning(two_checkpoints, tmp_path, caplog):
    from wlora_dist.checkpoint.folders import resolve_resume

    root = _copy(two_checkpoints, tmp_path)
    shard = _shard(root / "step-00000002")
    shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="wlora_dist"):
        assert resolve_resume("auto", root) == root / "step-00000001"
    assert "step-00000002 is damaged" in caplog.text and "resuming from step-00000001" in caplog.text
    assert f"{shard.relative_to(root / 'step-00000002')} has 100 bytes" in caplog.text


@pytest.mark.inprocess
def test_a_damaged_checkpoint_named_explicitly_is_refused(two_checkpoints, tmp_path):
    from wlora_dist.checkpoint.folders import CheckpointError, resolve_resume

    root = _copy(two_checkpoints, tmp_path)
    rng = root / "step-00000002/rng/rank-00000.safetensors"
    data = bytearray(rng.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    rng.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is damaged \(rng/rank-00000.safetensors does not match its checksum\)"):
        resolve_resume(str(root / "step-00000002"), root)
    with pytest.raises(CheckpointError, match=r"intact ones beside it: \['step-00000001'\]"):
        resolve_resume(str(root / "step-00000002"), root)


@pytest.mark.inprocess
def test_when_every_checkpoint_is_damaged_auto_refuses_instead_of_starting_over(two_checkpoints, tmp_path):
    from wlora_dist.checkpoint.folders import CheckpointError, resolve_resume

    root = _copy(two_checkpoints, tmp_path)
    for ckpt in list_checkpoints(root):
        (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged .*config.json is missing"):
        resolve_resume("auto", root)


@pytest.mark.inprocess
def test_export_refuses_a_damaged_checkpoint(two_checkpoints, tmp_path):
    from wlora_dist.checkpoint.folders import CheckpointError
    from wlora_dist.checkpoint.peft import export_checkpoint

    root = _copy(two_checkpoints, tmp_path)
    shard = _shard(root / "step-00000002")
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="is damaged"):
        export_checkpoint(root / "step-00000002", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.inprocess
def test_a_run_resumes_from_the_last_intact_checkpoint(two_checkpoints, tiny_dir, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run / "checkpoints")
    shard = _shard(run / "checkpoints/step-00000002")
    shard.write_bytes(b"")
    with caplog.at_level("INFO", logger="wlora_dist"):
        _, result = train_in_process(
            tiny_dir,
            tmp_path,
            checkpoint={"resume_from": "auto"},
            train={"max_steps": 3},
            selection={"steps": 1},
        )
    assert "resumed from" in caplog.text and "step-00000001" in caplog.text and "is damaged" in caplog.text
    assert len(result.history) == 2 and (run / "adapter/adapter_model.safetensors").exists()


@pytest.mark.inprocess
def test_a_failed_checkpoint_write_leaves_nothing_and_says_where(tiny_dir, tmp_path, monkeypatch):
    """Disk full while meta.json is written: one message naming the folder and the fix, no
    .tmp or half-written checkpoint left, the run stops."""
    import errno
    from pathlib import Path

    from wlora_dist.checkpoint.folders import CheckpointError

    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step-00000001 failed: No space left on device"):
        train_in_process(tiny_dir, tmp_path, checkpoint={"every": 1}, train={"max_steps": 3}, selection={"steps": 1})
    assert list((tmp_path / "run/checkpoints").iterdir()) == []
