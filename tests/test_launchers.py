"""accelerate configs choose and configure the backend; every shipped launch config parses."""

from pathlib import Path

import pytest
import yaml

from wlora_dist.config import ConfigError, load_config
from wlora_dist.distributed.launchers import accelerate_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny_cpu.yaml"


def test_fsdp_env_selects_fsdp2_with_its_options():
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    cfg = load_config(TINY, [], accelerate_overrides(env))
    assert cfg.distributed.backend == "fsdp2"
    assert cfg.distributed.fsdp.reshard_after_forward is False and cfg.distributed.fsdp.cpu_offload is True
    assert cfg.model.gradient_checkpointing is True and cfg.train.mixed_precision == "bf16"


def test_deepspeed_env_selects_zero_stage_and_offload(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds),
    }
    cfg = load_config(TINY, [], accelerate_overrides(env))
    z = cfg.distributed.zero
    assert cfg.distributed.backend == "zero" and z.stage == 3 and z.offload_optimizer and not z.offload_params
    assert z.config_file == str(ds)


def test_command_line_beats_the_launcher_and_no_launcher_means_auto():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert load_config(TINY, ["distributed.zero.stage=2"], accelerate_overrides(env)).distributed.zero.stage == 2
    assert load_config(TINY, [], accelerate_overrides({})).distributed.backend == "auto"


def test_contradicting_backend_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.read_text() + "distributed: {backend: fsdp2}\n")
    with pytest.raises(ConfigError, match=r"distributed.backend: 'fsdp2' in the config, but the accelerate config"):
        load_config(cfg, [], accelerate_overrides({"ACCELERATE_USE_DEEPSPEED": "true"}))


def test_fp16_is_rejected_with_the_reason():
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        load_config(TINY, [], accelerate_overrides({"ACCELERATE_MIXED_PRECISION": "fp16"}))


@pytest.mark.parametrize("path", sorted((ROOT / "launch/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_parse_and_document_their_command(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert data.get("use_cpu") is False  # use_cpu: true makes accelerate start ONE process
    assert "accelerate launch --config_file launch/accelerate/" in path.read_text().split("\n\n")[0]


def test_users_deepspeed_json_wins_except_auto(tmp_path):
    import json

    from wlora_dist.config import config_from_dict
    from wlora_dist.distributed.settings import BackendSettings
    from wlora_dist.distributed.spec import read_user_deepspeed_json, resolve_backend
    from wlora_dist.distributed.zero_config import deepspeed_config
    from wlora_dist.errors import UserError

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
                "gradient_clipping": "auto",
                "train_micro_batch_size_per_gpu": "auto",
            }
        )
    )
    run = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"train": ["d"]},
            "optim": {"max_grad_norm": 0.5},
            "train": {"micro_batch_size": 3},
            "distributed": {"backend": "zero", "zero": {"stage": 2, "config_file": str(user)}},
        }
    )
    user_json = read_user_deepspeed_json(str(user))
    cfg = deepspeed_config(BackendSettings.of(run, resolve_backend(run.distributed, user_json), "cpu", user_json))
    assert cfg["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert cfg["gradient_clipping"] == 0.5 and cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    user.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_user_deepspeed_json(str(user))  # read once, by resolve_run


def test_fsdp_cpu_offload_without_gpu_is_a_clear_error():
    import torch

    from wlora_dist.config import config_from_dict
    from wlora_dist.distributed.env import DistEnv
    from wlora_dist.distributed.registry import make_backend
    from wlora_dist.errors import UserError
    from wlora_dist.resolved import resolve_run

    cfg = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"train": ["d"]},
            "distributed": {"backend": "fsdp2", "fsdp": {"cpu_offload": True}},
        }
    )
    with pytest.raises(UserError, match=r"cpu_offload: true needs a GPU"):
        make_backend(resolve_run(cfg).backend_settings("cpu"), DistEnv(0, 0, 2, torch.device("cpu")))


def test_a_lone_process_from_accelerate_without_a_config_is_named():
    from wlora_dist.distributed.launchers import lone_process_warning

    simple = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}  # what accelerate exported
    assert "started a single process" in lone_process_warning(simple, has_gpu=False)
    assert lone_process_warning({**simple, "WORLD_SIZE": "2"}, has_gpu=False) is None
    assert lone_process_warning(simple, has_gpu=True) is None
    assert lone_process_warning({}, has_gpu=False) is None  # plain python: one process asked for


def test_precision_and_the_machines_refusals_are_decided_once():
    """train.mixed_precision on a GPU is the one precision decision (autocast, FSDP2's bf16
    copies where distributed.fsdp.mixed_precision allows them, DeepSpeed's flag, the
    planner); a CPU run computes in the base dtype. Settings the machine cannot run are
    refused as the backend is made, each naming its field."""
    from wlora_dist.config import ConfigError, config_from_dict
    from wlora_dist.distributed.settings import BackendSettings, precision_of
    from wlora_dist.distributed.spec import BackendSpec
    from wlora_dist.distributed.zero_config import deepspeed_config
    from wlora_dist.planning.sources import PRESETS, run_plan_input

    def cfg(**sections):
        return config_from_dict({"model": {"path": "m"}, "data": {"train": ["d"]}, **sections})

    fsdp, zero = BackendSpec("fsdp2"), BackendSpec("zero", 2)
    for mp, gpu, bf16 in [("auto", True, True), ("bf16", True, True), ("no", True, False), ("auto", False, False)]:
        run = cfg(train={"mixed_precision": mp})
        assert precision_of(run, gpu).bf16 is bf16
        device = "cuda" if gpu else "cpu"
        assert BackendSettings.of(run, fsdp, device).fsdp_bf16_params is bf16
        assert deepspeed_config(BackendSettings.of(run, zero, device))["bf16"] == {"enabled": bf16}
        assert run_plan_input(run, PRESETS["llama3-8b"], 8, fsdp, gpu).compute == ("bf16" if bf16 else "fp32")
    no_copies = cfg(distributed={"backend": "fsdp2", "fsdp": {"mixed_precision": "no"}})
    assert BackendSettings.of(no_copies, fsdp, "cuda").precision.bf16  # autocast still on ...
    assert not BackendSettings.of(no_copies, fsdp, "cuda").fsdp_bf16_params  # ... over fp32 copies
    replan = cfg(memory={"replan_at_prune": True})
    with pytest.raises(ConfigError, match=r"memory.replan_at_prune: true needs memory.budget_gib"):
        BackendSettings.of(replan, fsdp, "cpu")
    BackendSettings.of(replan, fsdp, "cuda")  # the GPU's memory is the budget
    BackendSettings.of(cfg(memory={"replan_at_prune": True, "budget_gib": 2.0}), fsdp, "cpu")
