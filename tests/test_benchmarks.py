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
