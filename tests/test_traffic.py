"""The bytes a step's collectives move, inside a node and across nodes
(wlora_dist/planning/traffic.py): unit checks of the model, then (launched) the model held
to what real gloo runs' collectives move, counted op by op (benchmarks/traffic.py)."""

import json
from dataclasses import replace

import pytest

from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.planning.memory_plan import PlanInput, base_param_bytes, sites
from wlora_dist.planning.sources import PRESETS
from wlora_dist.planning.traffic import group_members, moved, plan_traffic, step_transfers, traffic_of

GB = 1e9


def _inp(backend: BackendSpec, world: int = 32, **kw) -> PlanInput:
    return PlanInput(PRESETS["llama3-70b"], world_size=world, backend=backend, base="nf4", **kw)


def test_moved_counts_each_peers_chunk_and_splits_by_node():
    # 8 ranks, 4 to a node: rank 0's all-gather of 800 bytes receives 7 chunks of 100, 4 from the other node.
    assert moved("all_gather", range(8), 0, 4, 800) == (300, 400)
    assert moved("reduce_scatter", range(8), 0, 4, 800) == (300, 400)
    assert moved("all_reduce", range(8), 0, 4, 800) == (600, 800)  # a reduce-scatter and an all-gather
    assert moved("all_gather", (0, 1, 2, 3), 0, 4, 800) == (600, 0)  # a group inside the node
    assert moved("all_reduce", (0, 4), 0, 4, 800) == (0, 800)  # a replica group across nodes
    assert moved("all_gather", (0,), 0, 4, 800) == (0, 0)


def test_groups_follow_the_mesh_shard_innermost():
    hsdp = _inp(BackendSpec("fsdp2", shard_size=8), world=32)
    assert group_members("shard", 13, 32, hsdp) == tuple(range(8, 16))
    assert group_members("replicate", 13, 32, hsdp) == (5, 13, 21, 29)
    hpz = _inp(BackendSpec("zero", 3, hpz_size=8), world=32)
    assert group_members("hpz", 13, 32, hpz) == tuple(range(8, 16))
    assert group_members("world", 13, 32, hpz) == tuple(range(32))


def test_hsdp_keeps_the_base_in_the_node_and_sends_only_gradients_across():
    fsdp, hsdp = (plan_traffic(_inp(BackendSpec("fsdp2", shard_size=s)), 8) for s in (0, 8))
    base = sum(base_param_bytes(_inp(BackendSpec("fsdp2")))[:2])
    # FSDP2 over 4 nodes: forward and backward gather the base, 24 of every 31 chunks from other nodes.
    assert fsdp.before.across["base"] == pytest.approx(2 * base * 24 / 32, rel=0.01)
    assert fsdp.before.inside["base"] == pytest.approx(2 * base * 7 / 32, rel=0.01)
    assert hsdp.before.across.get("base", 0) == 0
    assert hsdp.before.inside["base"] == pytest.approx(2 * base * 7 / 8, rel=0.01)
    # Across nodes HSDP moves the adapters' gradients only: the n adapters', then the K kept's.
    assert hsdp.before.across_total < 0.01 * fsdp.before.across_total
    assert hsdp.after.across_total < hsdp.before.across_total / 10


def test_hpz_gathers_the_frozen_base_inside_a_node():
    z3, hpz = (plan_traffic(_inp(BackendSpec("zero", 3, hpz_size=h)), 8) for h in (0, 8))
    assert hpz.before.across["base"] < 1e-4 * hpz.before.inside["base"]  # the persistent norms, once a step
    assert hpz.before.inside["base"] == pytest.approx(z3.before.inside["base"] + z3.before.across["base"], rel=0.3)
    assert z3.before.across["base"] > 40 * GB


def test_the_prune_event_shrinks_what_adapters_and_their_gradients_move():
    for backend in (BackendSpec("fsdp2"), BackendSpec("fsdp2", shard_size=8), BackendSpec("zero", 3)):
        t = plan_traffic(_inp(backend, k=32), 8)
        for what in ("gradients",):
            before = t.before.inside.get(what, 0) + t.before.across.get(what, 0)
            after = t.after.inside.get(what, 0) + t.after.across.get(what, 0)
            assert after < before / 10, (backend, what)
        assert t.after.across_total + t.after.inside_total < t.before.across_total + t.before.inside_total


def test_checkpointing_regathers_under_zero3_not_under_fsdp2_and_accumulation_multiplies():
    for backend, extra in ((BackendSpec("fsdp2"), 1.0), (BackendSpec("zero", 3), 2.0)):
        off = plan_traffic(_inp(backend), 8).before
        on = plan_traffic(_inp(backend, activation_checkpointing=True), 8).before
        base_off = off.inside["base"] + off.across["base"]
        base_on = on.inside["base"] + on.across["base"]
        # ZeRO-3: forward once, backward (recomputation + backward) twice: about 3/2 of forward + backward.
        assert base_on / base_off == pytest.approx(1.0 if extra == 1.0 else 1.5, rel=0.02), backend
        twice = plan_traffic(_inp(backend, grad_accum=2), 8).before
        # Twice the gathers, but for the persistent norms (once a step under ZeRO-3).
        assert twice.inside["base"] + twice.across["base"] == pytest.approx(2 * base_off, rel=1e-3)


def test_zero_persistent_parameters_are_not_gathered_per_micro_batch():
    inp = _inp(BackendSpec("zero", 3), world=8, grad_accum=4)
    small = step_transfers(inp, sites(inp), True, 4, zero_persistence=10**12)  # every parameter persistent
    gathers = [t for t in small if t.kind == "all_gather" and t.what == "base" and t.nbytes]
    assert gathers and all(t.count == 1 for t in gathers)


def test_one_node_moves_nothing_across():
    t = plan_traffic(replace(_inp(BackendSpec("fsdp2")), world_size=8), 8)
    assert t.before.across_total == 0 and t.before.inside_total > 0


def test_plan_nodes_prints_the_traffic_of_each_layout(capsys):
    from wlora_dist.cli import main

    args = ["plan", "--model", "llama3-70b", "--base", "nf4", "--nodes", "2", "--gpus-per-node", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("moves per step:") == 4 and "GB across nodes" in text
    assert main([*args, "--json"]) == 0
    rows = {r["layout"]: r for r in json.loads(capsys.readouterr().out)["layouts"]}
    hsdp = rows["HSDP"]["traffic_bytes_per_step"]
    fsdp = rows["FSDP2"]["traffic_bytes_per_step"]
    assert sum(hsdp["before"]["across"].values()) < 0.01 * sum(fsdp["before"]["across"].values())


def test_every_transfer_names_a_known_group_and_kind():
    for backend in (BackendSpec("fsdp2", shard_size=8), BackendSpec("zero", 3, hpz_size=8), BackendSpec("zero", 2)):
        inp = _inp(backend)
        for t in step_transfers(inp, sites(inp), True):
            assert t.kind in ("all_gather", "reduce_scatter", "all_reduce") and t.nbytes >= 0
            assert t.group in ("world", "shard", "replicate", "hpz")
        assert traffic_of(step_transfers(inp, sites(inp), True), inp, 8).inside_total > 0


# ---------------------------------------------------------------- measured on CPU


@pytest.mark.launched
@pytest.mark.timeout(900)
def test_planned_traffic_matches_the_collectives_real_runs_call(tmp_path):
    """4 gloo ranks as 2 "nodes" of 2: FSDP2 (checkpointing, 2 micro-batches), HSDP 2 x 2
    (8-bit base), ZeRO-3 (checkpointing), hpZ (2 micro-batches) and ZeRO-3 with DeepSpeed's
    persistence threshold: rank by rank, inside and across nodes, a selection step and a
    step after the prune event within 5% of the model."""
    from benchmarks.traffic import TEST_CASES, format_rows, run_cases

    from .helpers import launch

    rows = run_cases(tmp_path, TEST_CASES, launch=launch)
    table = format_rows(rows)
    assert len(rows) == 2 * len(TEST_CASES)
    for row in rows:
        for rank, measured in enumerate(row["measured"]):
            for planned, got, where in zip(row["planned"], measured, ("inside", "across"), strict=True):
                assert got > 0 or planned == 0, (row["case"], row["step"], rank, where, table)
                assert planned == pytest.approx(got, rel=0.05), (row["case"], row["step"], rank, where, table)
    got = {(r["case"], r["phase"]): r["measured"][0] for r in rows}
    # HSDP and hpZ: what crosses nodes is gradients and adapters; FSDP2's and ZeRO-3's base gathers cross.
    for case in ("hsdp 2x2 int8", "zero3 hpz2 accum2"):
        inside, across = got[(case, "selection")]
        assert across < 0.1 * inside, (case, table)
    for case in ("fsdp2 ckpt accum2", "zero3 ckpt"):
        inside, across = got[(case, "selection")]
        assert across > inside, (case, table)
