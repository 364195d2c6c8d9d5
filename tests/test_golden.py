"""Golden runs: the per-step losses, eval loss and kept set of fixed tiny runs, pinned.

A change that shifts the numbers (of both sides of a comparison, say) fails here, so any
change in what the method computes is a visible decision: regenerate with
``WLORA_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py`` and say why in the commit.
The values were computed before the package was reorganised and held after it; they were
regenerated when data loading got its own generator (the dropout stream moved), and when the
selection phase moved to a constant LR by default (selection.schedule: constant).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import tiny_config_dict
from .helpers import run_worker, zero3_partitioned_config

GOLDEN = Path(__file__).with_name("golden") / "runs.json"
REGEN = os.environ.get("WLORA_REGEN_GOLDEN") == "1"
LOSS_ATOL = 1e-5  # float32 on CPU; the same machine type and torch pin as CI


def _config(tiny_dir: Path, out: Path, name: str, micro_batch: int) -> dict:
    """Dropout on, gradient accumulation 2, a projection every 2 steps, prune at step 4."""
    cfg = tiny_config_dict(
        tiny_dir,
        out,
        adapter={"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        selection={"steps": 4, "k": 5, "project_every": 2},
        train={"max_steps": 7, "grad_accum_steps": 2, "micro_batch_size": micro_batch},
    )
    if name == "plus":
        cfg["selection"].update({"steps": 4, "rounds": 2, "project_every": 1})
    if name == "fsdp2x2":
        cfg["distributed"] = {"backend": "fsdp2"}
    if name == "zero3x2":
        cfg["distributed"] = zero3_partitioned_config(out)
    return cfg


CASES = {  # name: processes
    "one": 1,
    "plus": 1,
    "fsdp2x2": 2,
    "zero3x2": 2,
}


def _summary(rank0: dict) -> dict:
    return {"losses": rank0["losses"], "eval_loss": rank0["eval_loss"], "kept": rank0["kept"]}


@pytest.mark.launched
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.dist] if p > 1 else []) for n, p in CASES.items()])
def test_golden_run(name, tiny_dir, tmp_path):
    nproc = CASES[name]
    ranks = run_worker(_config(tiny_dir, tmp_path / "run", name, 8 // nproc), nproc)
    got = _summary(ranks[0])
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if REGEN:
        golden[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden values regenerated")
    want = golden[name]
    assert got["kept"] == want["kept"]
    assert len(got["losses"]) == len(want["losses"])
    for step, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True), start=1):
        assert abs(a - b) < LOSS_ATOL, f"step {step}: loss {a!r}, golden {b!r}"
    assert abs(got["eval_loss"] - want["eval_loss"]) < LOSS_ATOL
