"""benchmarks/compare.py's driver and its GPU modes' CPU stand-ins (its tiny-cpu mode end to
end, files and counts, runs inside the device call's stand-in: tests/test_device_call.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_failing_configuration_is_recorded_and_the_mode_goes_on(tmp_path, monkeypatch):
    """benchmarks/compare.py's driver (workers replaced, nothing trains): each configuration's
    line is in partial.jsonl before the next one starts, so a mode stopped by its budget keeps
    what it finished; one that fails (out of memory, a crash) is recorded with the planned
    bytes and the others still run and are summarised."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import compare

    partial = tmp_path / "partial.jsonl"
    started: list[tuple[str, int]] = []

    def fake_worker(mode_name, which, keep, timeout, timed, standin=False):
        started.append((which, len(partial.read_text().splitlines())))
        if which == "c":
            raise compare.ConfigurationFailed("configuration (c) failed (exit 1):\nCUDA out of memory")
        return {
            "config": which,
            "tokens_per_s": {"a": 100.0, "b": 98.0, "d": 130.0, "e": 140.0}[which],
            "tokens_per_s_per_gpu": {"a": 100.0, "b": 98.0, "d": 130.0, "e": 140.0}[which],
            "spread": 0.01,
            "steps": 10,
            "flops_per_token": 1e6,
            "scope": "the whole step",
            "peak_bytes": 2**30,
            "reserved_peak_bytes": None,
            "resident_bytes": 2**29,
            "per_rank_bytes": {"trainable_param_bytes": 1, "grad_bytes": 1, "optimizer_state_bytes": 2},
            "adapters": 14 if which != "d" else 4,
            "kept": ["model.layers.0.mlp.down_proj"],
            "kept_sites": [[0, "down_proj"]],
            "prune_seconds": None,
            "setup_seconds": 0.1,
            "activation_checkpointing": False,
            "device": "cpu",
        }

    monkeypatch.setattr(compare, "run_worker", fake_worker)
    s = compare.compare("tiny-cpu", tmp_path, timeout=10)
    # (a) first, each line written before the next configuration starts
    assert started == [("a", 0), ("b", 1), ("c", 2), ("d", 3), ("e", 4)]
    lines = [json.loads(x) for x in partial.read_text().splitlines()]
    assert [x["config"] for x in lines] == ["a", "b", "c", "d", "e"]
    assert "CUDA out of memory" in lines[2]["error"] and lines[2]["planned_peak_bytes"] > 0
    assert all(x["planned_peak_bytes"] > 0 for x in lines)
    assert [r["config"] for r in s["results"]] == ["a", "b", "d", "e"] and set(s["failed"]) == {"c"}
    assert s["c_over_a"] is None and abs(s["selection_overhead"] - (100 / 98 - 1)) < 1e-9
    md = (tmp_path / "results.md").read_text()
    assert "failed: configuration (c) failed (exit 1):" in md and (tmp_path / "results.png").is_file()


def test_configuration_d_is_recorded_as_failed_when_b_fails(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import compare

    def fake_worker(mode_name, which, keep, timeout, timed, standin=False):
        raise compare.ConfigurationFailed(f"configuration ({which}) ran past --timeout 10 s")

    monkeypatch.setattr(compare, "run_worker", fake_worker)
    with pytest.raises(SystemExit, match="every configuration of tiny-cpu failed"):
        compare.compare("tiny-cpu", tmp_path, timeout=10, only="bd")
    lines = [json.loads(x) for x in (tmp_path / "partial.jsonl").read_text().splitlines()]
    assert [x["config"] for x in lines] == ["b", "d"] and "needs the set (b) keeps" in lines[1]["error"]


@pytest.mark.inprocess
def test_configuration_d_on_a_meta_built_8bit_base_attaches_only_the_kept_set():
    """(d), plain peft on (b)'s kept set, over a base built on meta with 8-bit linears (as
    the 1b-int8 GPU mode builds it): it used to attach all n adapters and remove the rest,
    and materialising the base then visited a removed adapter (KeyError)."""
    from dataclasses import replace

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks import compare

    mode = replace(compare.MODES["tiny-cpu"], quant="int8", checkpointing=False, budget_gib=None, timed=1)
    keep = ["model.layers.3.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    r = compare._run_config(mode, "d", keep, torch.device("cpu"))
    assert r["adapters"] == 3 and sorted(r["kept"]) == sorted(keep)
    hidden, inter, rank = 256, 688, 8
    expected = rank * ((hidden + inter) * 2 + hidden * 2) * 4  # A + B of up, down, q in float32
    assert r["per_rank_bytes"]["trainable_param_bytes"] == expected


def _nf4_cpu_mode(world_size: int, backend: str):
    """The nf4 GPU modes' settings on tiny-cpu's shape (intermediate 704: a multiple of the
    4-bit block size, as every real model's is), on the CPU."""
    from dataclasses import replace

    sys.path.insert(0, str(ROOT))
    from benchmarks import compare

    tiny = compare.MODES["tiny-cpu"]
    return replace(
        tiny,
        shape=replace(tiny.shape, intermediate=704),
        quant="nf4",
        double_quant=True,
        loss_shards=compare.MODES["70b-nf4-ws8"].loss_shards,
        checkpointing=False,
        budget_gib=0,
        warmup=1,
        timed=1,
        world_size=world_size,
        backend=backend,
    )


@pytest.mark.inprocess
def test_random_weights_fill_a_4bit_base_with_bnbs_own_codes():
    """The nf4 modes' base: RandomWeights draws float rows and the checkpoint reader's own
    quantisation turns them into codes, so every 4-bit layer holds bitwise what bitsandbytes'
    quantize_4bit (double quantisation on) makes of those rows."""
    import bitsandbytes as bnb
    import torch

    from benchmarks.harness import RandomWeights, random_llama
    from wlora_dist.model.nf4 import Linear4bit
    from wlora_dist.model.sharded_loading import fill_base

    shape = _nf4_cpu_mode(1, "replicated").shape
    model = random_llama(shape, torch.device("cpu"), torch.float32, quant="nf4", double_quant=True)
    model.to_empty(device="cpu")
    fill_base(model, RandomWeights(model))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 7 * shape.layers and "lm_head" not in layers
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj"):
        layer = layers[name]
        rows = RandomWeights(model)._read(name + ".weight", 0, layer.out_features)
        packed, state = bnb.functional.quantize_4bit(rows, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(layer.weight.reshape(-1), packed.reshape(-1))
        assert torch.equal(layer.absmax.reshape(-1), state.absmax.reshape(-1))
        assert torch.equal(layer.nested_absmax.view(torch.float32), state.state2.absmax.float())
        assert layer.nested_offset.view(torch.float32).item() == pytest.approx(float(state.offset), abs=0.0)
        # And the codes are NF4's: each weight within half of NF4's widest step (-1 to -0.696:
        # 0.152 of its block's absmax), plus the double quantisation's error on the absmax
        # (measured: 0.155 at most here; 0.0921 relative in the mean square).
        block_max = rows.view(layer.out_features, -1, 64).abs().amax(-1, keepdim=True)
        err = (layer.dequantized_weight() - rows).view(layer.out_features, -1, 64).abs()
        assert (err <= 0.16 * block_max).all()


@pytest.mark.inprocess
@pytest.mark.parametrize("world_size,backend", [(1, "replicated"), (8, "fsdp2")])
def test_the_nf4_modes_run_on_a_cpu_stand_in(world_size, backend):
    """1b-nf4 (one process) and 70b-nf4-ws8 (rank 0 of 8 through the fake process group,
    where the double quantisation's gather of the absmax would come back empty) on a tiny
    shape: a finite loss, K adapters after the prune event, each rank holding its share
    of each kept adapter, and the planner's peak within 5% of the counted one."""
    import math

    import torch

    from benchmarks import compare

    mode = _nf4_cpu_mode(world_size, backend)
    r = compare.run_config(mode, "c", None)
    assert math.isfinite(r["loss"]) and r["adapters"] == mode.k and r["prune_layout_seconds"] is not None
    s, rank = mode.shape, mode.rank
    dims = {
        "q_proj": (s.hidden, s.heads * s.d),
        "k_proj": (s.hidden, s.kv_heads * s.d),
        "v_proj": (s.hidden, s.kv_heads * s.d),
        "o_proj": (s.heads * s.d, s.hidden),
        "gate_proj": (s.hidden, s.intermediate),
        "up_proj": (s.hidden, s.intermediate),
        "down_proj": (s.intermediate, s.hidden),
    }
    chunk = lambda rows: -(-rows // world_size)  # noqa: E731 (FSDP2's rows per rank)
    expected = sum(
        (chunk(rank) * dims[kind][0] + chunk(dims[kind][1]) * rank) * 4 for _, kind in r["kept_sites"]
    )  # A [r, in] and B [out, r], float32
    assert r["per_rank_bytes"]["trainable_param_bytes"] == expected
    planned = compare.planned(mode, "c", r["kept_sites"], r["activation_checkpointing"])
    assert abs(planned - r["peak_bytes"]) <= 0.05 * r["peak_bytes"], (planned, r["peak_bytes"])
    assert torch.distributed.is_initialized() is False  # the fake group is gone with the run
