"""Familiar knobs that cost little: the attention kernel, rsLoRA scaling and LoRA+ (B's own
learning rate), each trained through the real trainer, the export still a plain peft
adapter that reproduces the model."""

import json

import pytest
import torch

from wlora_dist.config import ConfigError, config_from_dict
from wlora_dist.distributed.spec import check_backend_supports, resolve_backend
from wlora_dist.training.preflight import check_attention

from .conftest import tiny_config_dict
from .helpers import assert_export_reproduces_the_model
from .helpers import train_in_process as _train


@pytest.mark.inprocess
def test_eager_attention_trains_as_sdpa_does(tiny_dir, tmp_path):
    _, sdpa = _train(tiny_dir, tmp_path / "a", train={"max_steps": 4})
    trainer, eager = _train(tiny_dir, tmp_path / "b", train={"max_steps": 4}, model={"attn_implementation": "eager"})
    assert trainer.wl.base_model.config._attn_implementation == "eager"
    for a, b in zip(sdpa.history, eager.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4


def test_flash_attention_without_its_package_is_refused_naming_the_field():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation: flash_attention_2 needs the flash-attn"):
        check_attention("flash_attention_2")
    check_attention("sdpa")


@pytest.mark.inprocess
def test_rslora_scales_by_the_square_root_and_exports_to_plain_peft(tiny_dir, tmp_path):
    # WeightLoRA+ rounds change the ranks: the export's alpha_pattern must keep each scaling.
    sel = {"steps": 4, "rounds": 2, "project_every": 1}
    trainer, _ = _train(tiny_dir, tmp_path, adapter={"use_rslora": True}, selection=sel, train={"max_steps": 6})
    site = trainer.wl.kept_sites()[0]
    layer = trainer.wl.lora_layer(site)
    assert float(layer.scaling["default"]) == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r) at the first rank
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert config["use_rslora"] is True
    assert_export_reproduces_the_model(trainer, tiny_dir / "model", tmp_path / "run/adapter")


@pytest.mark.inprocess
def test_loraplus_gives_b_its_own_learning_rate(tiny_dir, tmp_path):
    """B starts at zero, so the first AdamW step moves each B entry by its group's learning
    rate (Adam's first update is lr * sign(g)); A's gradient is zero then."""
    common = {"train": {"max_steps": 1}, "selection": {"steps": 1, "k": 14, "method": "none"}}
    plain, _ = _train(tiny_dir, tmp_path / "a", optim={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}, **common)
    plus, _ = _train(
        tiny_dir,
        tmp_path / "b",
        optim={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "loraplus_lr_ratio": 16},
        **common,
    )
    groups = plus.backend.optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 16.0] and len(groups[1]["params"]) == 14
    b_plain = max(float(p.abs().max()) for p in plain.wl.trainable_parameters()[1::2])
    b_plus = max(float(p.abs().max()) for p in plus.wl.trainable_parameters()[1::2])
    assert b_plain == pytest.approx(1e-3, rel=0.01) and b_plus == pytest.approx(16e-3, rel=0.01)
    a_plain = plain.wl.trainable_parameters()[0::2]
    a_plus = plus.wl.trainable_parameters()[0::2]
    for x, y in zip(a_plain, a_plus, strict=True):  # A's learning rate is the schedule's in both
        torch.testing.assert_close(x, y)
    assert_export_reproduces_the_model(plus, tiny_dir / "model", tmp_path / "b/run/adapter")


def test_loraplus_under_zero_is_refused_naming_the_field(tiny_dir, tmp_path):
    cfg = config_from_dict(
        tiny_config_dict(
            tiny_dir, tmp_path, optim={"loraplus_lr_ratio": 16}, distributed={"backend": "zero", "zero": {"stage": 2}}
        )
    )
    with pytest.raises(ConfigError, match=r"optim\.loraplus_lr_ratio: 16 \(LoRA\+\) needs its own parameter group"):
        check_backend_supports(cfg, resolve_backend(cfg.distributed))
