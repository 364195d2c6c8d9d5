"""World size 32 on one CPU: rank 0 of 32 in this process (torch's fake process group:
every shard, buffer and activation has its real size, collectives do nothing). The
trainer's own step runs through the prune event under FSDP2 over all 32 ranks and HSDP
4 x 8 (the 4-node x 8-GPU layout of the 405B recipe), float and 8-bit bases: what this
rank holds of the base is 1 / (its shard group) of it, before and after the prune, and
after the prune it holds the K kept adapters' share only."""

import math

import pytest
import torch

from benchmarks.harness import Harness, bench_config, fake_world, random_llama
from wlora_dist.distributed.base import base_bytes_by_dtype
from wlora_dist.distributed.env import DistEnv
from wlora_dist.planning.memory_plan import PlanInput, base_param_bytes
from wlora_dist.planning.shapes import ModelShape

pytestmark = pytest.mark.inprocess

CPU = torch.device("cpu")
WORLD = 32
# Wide enough that every weight has a row for each of 32 ranks (no rank holds only padding).
SHAPE = ModelShape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512)
RANK, K = 4, 3


def _run(shard: int, int8: bool) -> dict:
    with fake_world(WORLD):
        env = DistEnv(0, 0, WORLD, CPU)
        cfg = bench_config(
            {
                "adapter.lora_rank": RANK,
                "selection.k": K,
                "selection.steps": 2,
                "train.max_steps": 4,
                "train.micro_batch_size": 1,
                "data.seq_len": 16,
                "distributed.backend": "fsdp2",
                "distributed.fsdp.shard_size": shard,
                "model.dtype": "float32",
            }
        )
        model = random_llama(SHAPE, CPU, torch.float32, meta=True, quant="int8" if int8 else "none")
        h = Harness.build(cfg, env, model)
        peft = h.trainer.wl.peft_model
        out: dict = {"mesh": tuple(h.trainer.backend.mesh.shape), "base": [sum(base_bytes_by_dtype(peft).values())]}
        out["full_base"] = sum(
            p.numel() * p.element_size() for p in peft.parameters() if not p.requires_grad
        )  # DTensors: numel is the whole parameter's
        losses, trainable = [], []
        for _ in range(4):
            losses.append(h.run_step()["loss"])
            trainable.append(h.step_bytes.last["trainable_param_bytes"])
            out["base"].append(sum(base_bytes_by_dtype(peft).values()))
        out.update(losses=losses, trainable=trainable, kept=len(h.trainer.wl.kept_sites()))
        out["n"] = len(h.trainer.wl.sites)
        out["params_left"] = len(h.trainer.wl.trainable_parameters())
        group = shard or WORLD
        # Rank 0's share of each kept adapter: FSDP2 splits rows into chunks of ceil(rows / group).
        out["adapter_share"] = sum(
            -(-p.shape[0] // group) * p[0].numel() * p.element_size() for p in h.trainer.wl.trainable_parameters()
        )
        out["adapter_full"] = sum(p.numel() * p.element_size() for p in h.trainer.wl.trainable_parameters())
    return out


@pytest.mark.parametrize(
    ("shard", "int8", "mesh"),
    [(0, False, (WORLD,)), (8, False, (4, 8)), (8, True, (4, 8))],
    ids=["fsdp2-32", "hsdp-4x8", "hsdp-4x8-int8"],
)
def test_rank_0_of_32_holds_a_shard_group_share_through_the_prune_event(shard, int8, mesh):
    r = _run(shard, int8)
    group = shard or WORLD
    assert r["mesh"] == mesh
    assert all(math.isfinite(x) for x in r["losses"])
    assert r["kept"] == K and r["params_left"] == 2 * K
    # The base: 1 / shard group of it on this rank, at load and after every step (the
    # prune event included), within the rows' padding to the group.
    for held in r["base"]:
        assert held == pytest.approx(r["full_base"] / group, rel=0.02), (held, r["full_base"], group)
    # The planner's per-rank base for this layout agrees (its int8 counts the same bytes).
    plan_base = sum(base_param_bytes(PlanInput(SHAPE, base="int8" if int8 else "fp32", compute="fp32"))[:2])
    assert r["full_base"] == pytest.approx(plan_base, rel=0.01)
    # Trainable bytes after the prune: the K kept adapters' shares exactly (the gates are
    # frozen by then; lora_A's RANK rows give rank 0 one row of 32, ranks 4-31 none), the
    # removed ones gone; the n adapters' in selection were many more.
    assert r["trainable"][-1] == r["adapter_share"] < r["adapter_full"]
    assert r["trainable"][0] > 3 * r["trainable"][-1]
