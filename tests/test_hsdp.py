"""Hybrid sharding (HSDP) under FSDP2, for real on 4 gloo ranks: a 2 x 2 mesh (2 replicas,
each a shard group of 2 ranks), as 2 nodes x 2 GPUs would run it.

The base is sharded within a shard group and replicated across the groups: each rank
holds half of it (not a quarter), the ranks at one shard position hold the same half, and
nothing is left gathered. The adapters' gradients (reduce-scattered in the group,
all-reduced across replicas) and the gates' (all-reduced over all 4 ranks) are means
over the whole world: the run equals one process on the same global batch, through a
WeightLoRA+ round and the prune event, on a float, an 8-bit and a 4-bit base. Its
checkpoints resume on other meshes (1 x 4, 4 x 1), on 3 ranks and in 1 process.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT
from .helpers import assert_base_held_as_uninterrupted, rounds_config, run_command, run_worker_many

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROWS = 12  # the global batch of every world size here (1, 3 and 4 ranks)
BASES = ["none", "int8", "nf4"]


def _cfg(tiny_dir, out, nproc: int, quantization: str = "none", shard_size: int | None = 2, **checkpoint) -> dict:
    backend = "replicated" if shard_size is None else "fsdp2"
    cfg = rounds_config(tiny_dir, out, backend, ROWS // nproc, quantization, **checkpoint)
    if shard_size is not None:
        cfg["distributed"]["fsdp"] = {"shard_size": shard_size}
    if quantization != "none":
        cfg["checkpoint"] = {"every": 0}
    return cfg


@pytest.fixture(scope="module")
def one(tiny_dir, tmp_path_factory):
    """base -> the 1-process run's rank record and checkpoints (one launch)."""
    tmp = tmp_path_factory.mktemp("hsdp-one")
    cfgs = [_cfg(tiny_dir, tmp / q, 1, q, shard_size=None) for q in BASES]
    return {q: (r[0], tmp / q / "checkpoints") for q, r in zip(BASES, run_worker_many(cfgs, 1), strict=True)}


def _hpz_cfg(tiny_dir, out, size: int) -> dict:
    cfg = rounds_config(tiny_dir, out, "zero3", ROWS // 4, every=0)
    cfg["distributed"]["zero"]["hpz_partition_size"] = size
    return cfg


@pytest.fixture(scope="module")
def four_ranks(tiny_dir, tmp_path_factory):
    """One launch of 4 ranks: the 2 x 2 runs per base, then ZeRO-3 plain and with hpZ over
    pairs (DeepSpeed's zero_hpz_partition_size 2, as 2 nodes x 2 would set it), through a
    WeightLoRA+ round and the prune event (each rebuilds the engine). ZeRO-3 last."""
    tmp = tmp_path_factory.mktemp("hsdp-2x2")
    cfgs = [_cfg(tiny_dir, tmp / q, 4, q) for q in BASES]
    cfgs += [_hpz_cfg(tiny_dir, tmp / "zero3", 1), _hpz_cfg(tiny_dir, tmp / "hpz", 2)]
    runs = run_worker_many(cfgs, 4)
    out = {q: (r, tmp / q) for q, r in zip(BASES, runs, strict=False)}
    out["zero3"], out["hpz"] = runs[-2:]
    return out


@pytest.fixture(scope="module")
def hsdp(four_ranks):
    """base -> the 2 x 2 run's rank records and run folder."""
    return {q: four_ranks[q] for q in BASES}


@pytest.mark.parametrize("base", BASES)
def test_a_2x2_mesh_trains_as_one_process_does(hsdp, one, base):
    ranks, _ = hsdp[base]
    ref, _ = one[base]
    assert [r["torch_dist_world_size"] for r in ranks] == [4] * 4
    assert all(r["mesh_shape"] == [2, 2] for r in ranks)
    # Every rank sees other rows (the replicas too), and ends with the same adapters and gates.
    local = [r["local_losses"][0] for r in ranks]
    assert len(set(local)) == 4, local
    assert len({r["params_digest"] for r in ranks}) == 1 and len({r["gates_digest"] for r in ranks}) == 1
    assert [(x["k"], x["rank"], x["kept"]) for x in ranks[0]["rounds_log"]] == [
        (x["k"], x["rank"], x["kept"]) for x in ref["rounds_log"]
    ]
    assert ranks[0]["kept"] == ref["kept"]
    for a, b in zip(ref["losses"], ranks[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (ref["losses"], ranks[0]["losses"])


@pytest.mark.parametrize("base", BASES)
def test_each_rank_holds_half_the_base_shared_with_its_replica(hsdp, base):
    """Shard groups {0, 1} and {2, 3}; ranks 0 and 2 (1 and 3) hold the same rows."""
    ranks, _ = hsdp[base]
    total = ranks[0]["base_total_bytes"]
    for r in ranks:
        assert abs(r["base_local_bytes"] - total / 2) <= 0.02 * total, (r["global_rank"], r["base_local_bytes"], total)
        assert r["base_resident_bytes"] == r["base_local_bytes"]  # nothing left gathered
        assert r["base_resident_after_setup"] == r["base_local_bytes"]  # loaded as a half, never whole
    assert sum(r["base_local_bytes"] for r in ranks) == 2 * total
    digests = [r["base_local_digest"] for r in ranks]
    assert digests[0] == digests[2] and digests[1] == digests[3] and digests[0] != digests[1]
    if base == "none":  # each rank read its half of the checkpoint, not all of it
        assert all(r["load_bytes_read"] < 0.6 * total for r in ranks), [r["load_bytes_read"] for r in ranks]


@pytest.mark.parametrize("base", BASES)
def test_the_prune_event_frees_the_removed_adapters_on_a_2x2_mesh(hsdp, base):
    ranks, run = hsdp[base]
    kept = load_file(str(run / "adapter/adapter_model.safetensors"))
    kept_bytes = sum(t.numel() * t.element_size() for t in kept.values())
    for r in ranks:
        assert r["removed_alive"] == 0
        after = r["memory"]["after"]
        # The K kept adapters, sharded in 2 (the shard group), whatever the 2 replicas.
        assert after["trainable_param_bytes"] == after["grad_bytes"] == kept_bytes // 2
        assert after["optimizer_state_bytes"] == 2 * kept_bytes // 2 + 4 * len(kept)
        assert after["trainable_param_bytes"] < r["memory"]["before"]["trainable_param_bytes"]


@pytest.fixture(scope="module")
def resumed(hsdp, tiny_dir, tmp_path_factory):
    """The 2 x 2 float run's step-5 checkpoint (after the round and the prune event)
    resumed on 2 x 2, 1 x 4, 4 x 1 (one launch), 3 ranks and 1 process."""
    _, run = hsdp["none"]
    ckpt = str(run / "checkpoints/step-00000005")
    tmp = tmp_path_factory.mktemp("hsdp-resumed")
    meshes = {"2x2": 2, "1x4": 0, "4x1": 1}
    four = run_worker_many([_cfg(tiny_dir, tmp / m, 4, shard_size=s, resume_from=ckpt) for m, s in meshes.items()], 4)
    out = dict(zip(meshes, four, strict=True))
    out["3"] = run_worker_many([_cfg(tiny_dir, tmp / "3", 3, shard_size=0, resume_from=ckpt)], 3)[0]
    out["1"] = run_worker_many([_cfg(tiny_dir, tmp / "1", 1, shard_size=None, resume_from=ckpt)], 1)[0]
    return out


def test_resume_on_the_same_mesh_is_bitwise(hsdp, resumed):
    ranks, _ = hsdp["none"]
    again = resumed["2x2"]
    assert again[0]["losses"] == ranks[0]["losses"][5:]
    assert {r["params_digest"] for r in again} == {ranks[0]["params_digest"]}
    assert_base_held_as_uninterrupted(again, ranks)


@pytest.mark.parametrize(("mesh", "shard"), [("1x4", 4), ("4x1", 1), ("3", 3), ("1", 1)])
def test_resume_on_another_mesh_or_world_size(hsdp, resumed, mesh, shard):
    ranks, _ = hsdp["none"]
    other = resumed[mesh]
    assert other[0]["kept"] == ranks[0]["kept"] and len({r["params_digest"] for r in other}) == 1
    for a, b in zip(other[0]["losses"], ranks[0]["losses"][5:], strict=True):
        assert abs(a - b) < 1e-4, (other[0]["losses"], ranks[0]["losses"][5:])
    total = other[0]["base_total_bytes"]
    for r in other:  # 1 / (ranks in a shard group) of the base, as if it had started there
        assert abs(r["base_local_bytes"] - total / shard) <= 0.05 * total
        assert r["base_resident_after_setup"] == r["base_resident_bytes"] == r["base_local_bytes"]
    want_mesh = {"1x4": [4], "4x1": [4, 1], "3": [3], "1": None}[mesh]  # 1 x 4 is plain FSDP2
    assert all(r["mesh_shape"] == want_mesh for r in other)


def test_export_of_a_2x2_checkpoint_equals_the_one_process_export(hsdp, one, tmp_path):
    _, run = hsdp["none"]
    exports = {}
    for name, folder in (("one", one["none"][1]), ("2x2", run / "checkpoints")):
        out = tmp_path / name
        proc = run_command(
            [sys.executable, "-m", "wlora_dist.cli", "export", str(folder / "step-00000007"), "--out", str(out)],
            timeout=300,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
        exports[name] = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(exports["2x2"]) == sorted(exports["one"]) and exports["one"]
    for key, value in exports["2x2"].items():
        torch.testing.assert_close(value, exports["one"][key], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def hpz(four_ranks):
    return four_ranks["zero3"], four_ranks["hpz"]


def test_zero3_hpz_trains_bitwise_as_zero3_and_holds_a_second_partition(hpz):
    """hpZ changes where backward's all-gathers go (within the pair), not the math; each
    rank holds its quarter of the base and hpZ's secondary half: 3/4, the price of keeping
    backward's all-gathers inside a node."""
    plain, hier = hpz
    assert [r["torch_dist_world_size"] for r in hier] == [4] * 4
    assert hier[0]["losses"] == plain[0]["losses"] and hier[0]["kept"] == plain[0]["kept"]
    assert {r["params_digest"] for r in hier} == {plain[0]["params_digest"]}
    total = plain[0]["base_total_bytes"]
    for p, h in zip(plain, hier, strict=True):
        assert abs(p["base_resident_bytes"] - total / 4) <= 0.03 * total
        assert abs(h["base_resident_bytes"] - (total / 4 + total / 2)) <= 0.05 * total, (
            h["base_resident_bytes"],
            total,
        )
