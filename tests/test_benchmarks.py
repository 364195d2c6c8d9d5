"""benchmarks/compare.py --mode tiny-cpu end to end: the files, and counts that must hold
whatever the machine's speed (no timing is asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .helpers import run_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.launched
@pytest.mark.slow
def test_tiny_cpu_comparison(tmp_path):
    out = tmp_path / "bench"
    # The work is bounded (one timed step per configuration); the limit only catches a hang,
    # so it is generous: a loaded 2-core machine once took over 600 s for a 141 s run.
    proc = run_command(
        [sys.executable, str(ROOT / "benchmarks/compare.py"), "--mode", "tiny-cpu", "--out", str(out), "--timed", "1"],
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "(d) plain peft LoRA on the same K" in md and "selection overhead" in md
    r = {x["config"]: x for x in s["results"]}
    assert set(r) == {"a", "b", "c", "d", "e"}
    assert r["a"]["adapters"] == r["b"]["adapters"] == 28 and r["c"]["adapters"] == r["d"]["adapters"] == 4
    # (c) kept in its own process the set (b) chose, and (d) trained exactly that set.
    assert r["c"]["kept"] == r["b"]["kept"] == r["d"]["kept"]
    # Same adapters, same bytes: after the prune event WeightLoRA holds what plain LoRA on K holds.
    assert r["c"]["per_rank_bytes"] == r["d"]["per_rank_bytes"]
    assert r["b"]["per_rank_bytes"] == r["a"]["per_rank_bytes"]
    for key in ("trainable_param_bytes", "grad_bytes", "optimizer_state_bytes"):
        assert r["c"]["per_rank_bytes"][key] * 4 < r["a"]["per_rank_bytes"][key]
    assert r["c"]["peak_bytes"] < r["a"]["peak_bytes"]
    # (e): the re-plan switched activation checkpointing off; the peak rose, as planned.
    assert r["c"]["activation_checkpointing"] and not r["e"]["activation_checkpointing"]
    assert r["e"]["peak_bytes"] > r["c"]["peak_bytes"]
    for x in s["results"]:
        assert 0.9 < x["planned_peak_bytes"] / x["peak_bytes"] < 1.1, x["config"]
        assert x["tokens_per_s"] > 0
    assert s["prune_seconds"] is not None and s["prune_seconds"] > 0
    assert 0 < s["prune_layout_seconds"] < s["prune_seconds"]  # the layout change alone: no probe forwards


def test_a_failing_configuration_is_recorded_and_the_mode_goes_on(tmp_path, monkeypatch):
    """benchmarks/compare.py's driver (workers replaced, nothing trains): each configuration's
    line is in partial.jsonl before the next one starts, so a mode stopped by its budget keeps
    what it finished; one that fails (out of memory, a crash) is recorded with the planned
    bytes and the others still run and are summarised."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import compare

    partial = tmp_path / "partial.jsonl"
    started: list[tuple[str, int]] = []

    def fake_worker(mode_name, which, keep, timeout, timed):
        started.append((which, len(partial.read_text().splitlines())))
        if which == "c":
            raise compare.ConfigurationFailed("configuration (c) failed (exit 1):\nCUDA out of memory")
        return {
            "config": which,
            "tokens_per_s": {"a": 100.0, "b": 98.0, "d": 130.0, "e": 140.0}[which],
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
    assert started == [("b", 0), ("c", 1), ("a", 2), ("d", 3), ("e", 4)]  # each line written before the next
    lines = [json.loads(x) for x in partial.read_text().splitlines()]
    assert [x["config"] for x in lines] == ["b", "c", "a", "d", "e"]
    assert "CUDA out of memory" in lines[1]["error"] and lines[1]["planned_peak_bytes"] > 0
    assert all(x["planned_peak_bytes"] > 0 for x in lines)
    assert [r["config"] for r in s["results"]] == ["a", "b", "d", "e"] and set(s["failed"]) == {"c"}
    assert s["c_over_a"] is None and abs(s["selection_overhead"] - (100 / 98 - 1)) < 1e-9
    md = (tmp_path / "results.md").read_text()
    assert "failed: configuration (c) failed (exit 1):" in md and (tmp_path / "results.png").is_file()


def test_configuration_d_is_recorded_as_failed_when_b_fails(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import compare

    def fake_worker(mode_name, which, keep, timeout, timed):
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

    mode = replace(compare.MODES["tiny-cpu"], int8=True, checkpointing=False, budget_gib=None, timed=1)
    keep = ["model.layers.3.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    r = compare._run_config(mode, "d", keep, torch.device("cpu"))
    assert r["adapters"] == 3 and sorted(r["kept"]) == sorted(keep)
    hidden, inter, rank = 256, 688, 8
    expected = rank * ((hidden + inter) * 2 + hidden * 2) * 4  # A + B of up, down, q in float32
    assert r["per_rank_bytes"]["trainable_param_bytes"] == expected
