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

from wlora_dist.config import ConfigError, config_from_dict
from wlora_dist.training.checkpoint import StopOnSignal, list_checkpoints
from wlora_dist.training.export import write_peft_adapter

from .conftest import tiny_config_dict
from .helpers import train_in_process


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


def test_ctrl_c_during_a_run_saves_a_checkpoint(tiny_dir, tmp_path):
    from wlora_dist.distributed.env import init_distributed
    from wlora_dist.training.callbacks import Callback
    from wlora_dist.training.trainer import Trainer

    class CtrlCAtStep2(Callback):
        def on_optimizer_step_end(self, trainer, optimizer_step):
            if optimizer_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run"))
    trainer = Trainer(cfg, init_distributed(), [CtrlCAtStep2()])
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
