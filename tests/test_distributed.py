"""Really distributed (2 gloo processes on CPU) against the 1-process reference.

Every assertion here would fail if the two processes silently trained alone: the world
size is read from torch.distributed, the ranks are shown to see different data, and yet
their adapters and gates end bitwise equal and match the 1-process run on the same
global batch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, tiny_config_dict

WORKER = ROOT / "tests" / "dist_worker.py"
pytestmark = pytest.mark.dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(cfg: dict, nproc: int, tmp: Path) -> list[dict]:
    out = Path(cfg["output"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp / f"cfg{nproc}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(cfg_path)]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}",
            str(WORKER),
            str(cfg_path),
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    common = {"selection": {"steps": 5, "k": 5, "project_every": 5}, "train": {"max_steps": 9, "grad_accum_steps": 2}}
    one = tiny_config_dict(tiny_dir, tmp / "one", **common)
    one["train"]["micro_batch_size"] = 8  # global batch = 2 ranks x 4
    two = tiny_config_dict(tiny_dir, tmp / "two", **common)
    return run_worker(one, 1, tmp), run_worker(two, 2, tmp)


def test_really_two_ranks_on_different_data(runs):
    _, two = runs
    assert [r["torch_dist_world_size"] for r in two] == [2, 2]
    assert [r["global_rank"] for r in two] == [0, 1]
    # Different rows on each rank: their own losses differ at every step ...
    assert all(abs(a - b) > 1e-6 for a, b in zip(two[0]["local_losses"], two[1]["local_losses"], strict=True))
    # ... yet after 9 all-reduced steps their adapters are bitwise the same.
    assert two[0]["params_digest"] == two[1]["params_digest"]


def test_gates_bitwise_equal_and_same_selection_on_every_rank(runs):
    _, two = runs
    assert two[0]["gates_digest"] == two[1]["gates_digest"]
    assert two[0]["kept"] == two[1]["kept"] and len(two[0]["kept"]) == 5
    assert sum(g != 0 for g in two[0]["gates"]) == 5


def test_matches_one_process_reference(runs):
    one, two = runs
    assert one[0]["world_size"] == 1
    assert one[0]["kept"] == two[0]["kept"]
    # Same global batch per step; only the summation order differs (float32).
    for a, b in zip(one[0]["losses"], two[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (one[0]["losses"], two[0]["losses"])
    # The mean of the rank losses is the global loss.
    for g, a, b in zip(two[0]["losses"], two[0]["local_losses"], two[1]["local_losses"], strict=True):
        assert abs(g - (a + b) / 2) < 1e-6


def test_prune_event_removed_and_freed_adapters_on_every_rank(runs):
    _, two = runs
    for r in two:
        assert r["n_removed"] == 2 * (14 - 5)  # A and B of every dropped adapter
        assert r["removed_alive"] == 0
        assert r["n_trainable"] == 2 * 5
        before, after = r["memory"]["before"], r["memory"]["after"]
        # Tiny Llama: hidden 32, MLP 64, 4 heads of 8, 2 kv heads; r = 4, float32.
        params_of = {
            "q_proj": 4 * (32 + 32),
            "k_proj": 4 * (32 + 16),
            "v_proj": 4 * (32 + 16),
            "o_proj": 4 * (32 + 32),
            "gate_proj": 4 * (32 + 64),
            "up_proj": 4 * (32 + 64),
            "down_proj": 4 * (64 + 32),
        }
        assert before["trainable_param_bytes"] == 2 * 4 * sum(params_of.values())
        kept_bytes = 4 * sum(params_of[name.rsplit(".", 1)[1]] for name in r["kept"])
        assert after["trainable_param_bytes"] == after["grad_bytes"] == kept_bytes
        assert before["grad_bytes"] == before["trainable_param_bytes"]
        # AdamW state: exp_avg + exp_avg_sq per kept tensor (+ a 4-byte step each), nothing else.
        n_tensors = 2 * len(r["kept"])
        assert after["optimizer_state_bytes"] == 2 * kept_bytes + 4 * n_tensors
        assert before["optimizer_state_bytes"] == 2 * before["trainable_param_bytes"] + 4 * 2 * 14
