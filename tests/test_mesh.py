"""HSDP's mesh, decided in one place (BackendSpec.mesh_shape) and read by the backend, the
planner, the logs and accelerate's parallelism_config: unit checks, no process started."""

import pytest

from wlora_dist.config import ConfigError, config_from_dict
from wlora_dist.distributed.launchers import accelerate_overrides
from wlora_dist.distributed.spec import BackendSpec, resolve_backend
from wlora_dist.errors import UserError
from wlora_dist.planning.memory_plan import PlanInput, plan
from wlora_dist.planning.sources import PRESETS

from .conftest import tiny_config_dict


@pytest.mark.parametrize(
    ("spec", "world", "mesh"),
    [
        (BackendSpec("fsdp2"), 8, (1, 8)),
        (BackendSpec("fsdp2", shard_size=4), 8, (2, 4)),
        (BackendSpec("fsdp2", shard_size=1), 4, (4, 1)),
        (BackendSpec("fsdp2", shard_size=8), 8, (1, 8)),  # one group: plain FSDP2
        (BackendSpec("fsdp2", shard_size=16), 8, (1, 8)),
        (BackendSpec("zero", 3), 8, (1, 8)),
        (BackendSpec("zero", 2), 8, (8, 1)),
        (BackendSpec("replicated"), 3, (3, 1)),
    ],
)
def test_mesh_shape(spec, world, mesh):
    assert spec.mesh_shape(world) == mesh


def test_a_shard_size_that_does_not_divide_the_world_is_refused_naming_the_field():
    problem = BackendSpec("fsdp2", shard_size=3).world_problem(8)
    assert problem and "distributed.fsdp.shard_size: 3" in problem and "8 ranks" in problem
    assert BackendSpec("fsdp2", shard_size=4).world_problem(8) is None
    with pytest.raises(ValueError, match="HSDP is FSDP2's"):
        BackendSpec("zero", 3, shard_size=2)


def test_the_config_field_reaches_the_backend(tiny_dir, tmp_path):
    cfg = config_from_dict(
        tiny_config_dict(tiny_dir, tmp_path, distributed={"backend": "fsdp2", "fsdp": {"shard_size": 2}})
    )
    assert resolve_backend(cfg.distributed) == BackendSpec("fsdp2", shard_size=2)
    with pytest.raises(ConfigError, match="shard_size"):
        config_from_dict(tiny_config_dict(tiny_dir, tmp_path, distributed={"fsdp": {"shard_size": -1}}))


def test_accelerate_parallelism_config_is_hsdp_and_other_parallelisms_are_refused():
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "2",
        "PARALLELISM_CONFIG_DP_SHARD_SIZE": "8",
        "PARALLELISM_CONFIG_TP_SIZE": "1",
    }
    assert ("distributed.fsdp.shard_size", 8) in accelerate_overrides(env)
    assert not any(
        k == "distributed.fsdp.shard_size"
        for k, _ in accelerate_overrides({**env, "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "1"})
    )
    with pytest.raises(UserError, match="parallelism_config_tp_size: 2"):
        accelerate_overrides({**env, "PARALLELISM_CONFIG_TP_SIZE": "2"})
    with pytest.raises(UserError, match="parallelism_config_cp_size: 2"):  # torch's ring attention
        accelerate_overrides({**env, "PARALLELISM_CONFIG_CP_SIZE": "2"})
    # sp_size (accelerate's DeepSpeed Ulysses) is distributed.sequence_parallel, under FSDP and DeepSpeed.
    assert ("distributed.sequence_parallel", 4) in accelerate_overrides({**env, "PARALLELISM_CONFIG_SP_SIZE": "4"})
    ds = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        "PARALLELISM_CONFIG_SP_SIZE": "2",
    }
    assert ("distributed.sequence_parallel", 2) in accelerate_overrides(ds)


def test_the_planner_divides_the_base_by_the_shard_group_not_the_world():
    shape = PRESETS["llama3-70b"]
    fsdp8 = plan(PlanInput(shape, 8, BackendSpec("fsdp2")))
    hsdp = plan(PlanInput(shape, 16, BackendSpec("fsdp2", shard_size=8)))
    fsdp16 = plan(PlanInput(shape, 16, BackendSpec("fsdp2")))
    assert hsdp.before.base == fsdp8.before.base == 2 * fsdp16.before.base
    assert hsdp.before.optimizer == fsdp8.before.optimizer  # adapters sharded in the group too
    assert "HSDP (2 x 8: replicas x shard group)" in BackendSpec("fsdp2", shard_size=8).describe(16)


def test_hpz_costs_a_second_partition_per_rank_in_the_plan_and_is_zero3s_only(tiny_dir, tmp_path):
    spec = BackendSpec("zero", 3, hpz_size=8)
    assert spec.base_fraction(16) == 1 / 16 + 1 / 8 and "hpZ" in spec.describe(16)
    shape = PRESETS["llama3-70b"]
    plain = plan(PlanInput(shape, 16, BackendSpec("zero", 3)))
    hier = plan(PlanInput(shape, 16, spec))
    assert abs(hier.before.base - 3 * plain.before.base) <= 3
    cfg = config_from_dict(
        tiny_config_dict(
            tiny_dir, tmp_path, distributed={"backend": "zero", "zero": {"stage": 3, "hpz_partition_size": 8}}
        )
    )
    assert resolve_backend(cfg.distributed) == spec
    assert "does not divide the 12 ranks" in spec.world_problem(12)
    with pytest.raises(ConfigError, match="hpz_partition_size: 8 partitions the parameters a second time"):
        config_from_dict(
            tiny_config_dict(
                tiny_dir, tmp_path, distributed={"backend": "zero", "zero": {"stage": 2, "hpz_partition_size": 8}}
            )
        )


def test_plan_nodes_compares_the_layouts_and_picks_hsdp_when_a_node_holds_the_base(capsys):
    import json

    from wlora_dist.cli import main

    args = ["plan", "--model", "llama3.1-405b", "--nodes", "4", "--gpus-per-node", "8", "--gpu-gib", "80"]
    assert main([*args, "--base", "nf4", "--activation-checkpointing", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["layout"]: r for r in out["layouts"]}
    assert set(rows) == {"FSDP2", "HSDP", "ZeRO-3", "ZeRO-3 hpZ"} and out["use"] == "HSDP"
    assert abs(rows["HSDP"]["base"] - 4 * rows["FSDP2"]["base"]) <= 4  # a node's 8 ranks, not all 32
    assert abs(rows["ZeRO-3 hpZ"]["base"] - 5 * rows["ZeRO-3"]["base"]) <= 5  # 1/32 + 1/8
    assert main([*args, "--base", "bf16", "--activation-checkpointing"]) == 0  # 94 GiB of base per node: too much
    text = capsys.readouterr().out
    assert "HSDP        base  94.50 GiB" in text and "does not fit" in text and "use FSDP2" in text
    assert main(["plan", "--model", "llama3-8b", "--nodes", "2"]) == 1
    assert "--gpus-per-node" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3-8b", "--world-size", "12", "--shard-size", "8"]) == 1
    assert "does not divide the 12 ranks" in capsys.readouterr().err
