"""What a training step holds per rank, per byte of frozen base, under every backend, on 2
and 4 gloo ranks, for the bf16, 8-bit and 4-bit bases (benchmarks/step_memory.py measures,
this asserts; the method is in its docstring).

Per byte of base a step's peak must be about 1 / world size where the base is sharded
(FSDP2, ZeRO-3) and about 1 where it is replicated (replicated, ZeRO-1/2, which also shows
the measure sees the base at all), and a forward without backward must leave nothing
gathered. Before DeepSpeed's ZeRO-3 sizes were set (distributed/zero_config.py, memory_limits),
its step held the whole base on every rank, in float32 on CPU: 2.5 bytes per byte of a
bf16 base at 2 ranks.
"""

from __future__ import annotations

import pytest

from benchmarks.step_memory import CASES, DEPTHS, SHARDED, measure, per_base_byte, write_models

from .helpers import launch

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("wide-llamas"))


@pytest.fixture(scope="module")
def measured(models, tmp_path_factory):
    """world size -> (backend, base) -> (per-rank records at the two depths)."""
    results: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in results:
            results[world] = measure(world, tmp_path_factory.mktemp(f"step-memory-{world}"), models, run=launch)
        return results[world]

    return get


def not_base(runs: dict, world: int, base: str) -> float:
    """What a layer costs a step beyond its base weights (activations, adapters and their
    state), per byte of base: the replicated-base run's excess over 1. Small beside a bf16
    layer (0.02), larger beside a 4-bit one (0.1)."""
    zero2 = runs[("zero2", base)]
    return max(0.0, max(per_base_byte(zero2[0][r], zero2[1][r]) for r in range(world)) - 1)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("backend", "base"), CASES, ids=[f"{b}-{q}" for b, q in CASES])
def test_a_steps_peak_grows_by_base_over_world_size(measured, world, backend, base):
    runs = measured(world)[(backend, base)]
    extra = not_base(measured(world), world, base)
    for rank in range(world):
        shallow, deep = runs[0][rank], runs[1][rank]
        assert deep["world_size"] == world  # really distributed: the group has every rank
        slope = per_base_byte(shallow, deep)
        if backend in SHARDED:
            # 1 / world of the base, plus what is not base, plus 0.1 (uneven rows, timing).
            assert slope <= 1 / world + extra + 0.1, (rank, slope, extra)
            # The worst step: at most a few layers more than the steady state (each is 1/12 here).
            assert per_base_byte(shallow, deep, worst=True) <= 1 / world + extra + 0.35, rank
        else:
            assert slope >= 0.95, (rank, slope)  # the base is replicated: the measure sees it
        for r in (shallow, deep):
            share = r["base_held"] / r["base_total"]
            expected = 1 / world if backend in SHARDED else 1.0
            assert abs(share - expected) <= 0.02 * expected, (r["tag"], rank, share)  # uneven rows, padding
            assert r["base_held_after_load"] == r["base_held"]
            # A forward without backward (eval, the prune event's probe) leaves nothing gathered.
            assert r["base_held_after_forward_only"] == r["base_held"], r["tag"]


def test_a_bf16_base_is_held_in_bf16_by_every_backend(measured, models):
    """ZeRO-3 builds its base inside DeepSpeed's zero.Init, which casts to the precision its
    config enables (float32 on a CPU, where the engine runs without bf16) unless told
    model.dtype (distributed/zero.py, _partition_config)."""
    runs = measured(2)
    for depth in range(len(DEPTHS)):
        totals = {b: runs[(b, "bf16")][depth][0]["base_total"] for b, q in CASES if q == "bf16"}
        assert len(set(totals.values())) == 1, totals
        float32_bytes = (models[DEPTHS[depth]] / "model.safetensors").stat().st_size  # + a small header
        assert totals["zero3"] <= float32_bytes / 2, (totals, float32_bytes)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", SHARDED)
@pytest.mark.parametrize("base", ["bf16", "int8", "nf4"])
def test_every_row_of_a_sharded_base_is_held_by_exactly_one_rank(measured, world, backend, base):
    for run in measured(world)[(backend, base)]:
        held = sum(r["base_held"] for r in run)
        assert run[0]["base_total"] <= held <= run[0]["base_total"] * 1.01  # ZeRO-3 pads the last partition


@pytest.mark.parametrize("backend", SHARDED)
@pytest.mark.parametrize("base", ["bf16", "int8", "nf4"])
def test_the_step_peak_per_base_byte_shrinks_with_the_world_size(measured, backend, base):
    two, four = (measured(w)[(backend, base)] for w in (2, 4))
    """Halving each rank's share (0.25 per byte of base) shows, less what is not base: an
    NF4 layer's adapters and activations weigh most beside its weights (0.55 -> 0.36 at
    2 -> 4 ranks, measured). The mean over ranks: one rank's step varies by a layer."""
    slope2 = sum(per_base_byte(two[0][r], two[1][r]) for r in range(2)) / 2
    slope4 = sum(per_base_byte(four[0][r], four[1][r]) for r in range(4)) / 4
    assert slope4 < slope2 - 0.1, (slope2, slope4)
