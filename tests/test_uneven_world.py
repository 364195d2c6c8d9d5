"""A world size that divides nothing: 3 ranks (3 nodes x 8 GPUs = 24 and 6-GPU nodes hit
the same case). Almost no adapter's element count is a multiple of 3 (q_proj's A is 4 x 32),
so every sharded tensor has a padded last shard. Under FSDP2 and ZeRO-3, a run with a
WeightLoRA+ round and the prune event, a resume across a layout change, and `wlora-dist
export` of a 3-rank checkpoint must all agree with the 1-process run on the same global
batch (6 rows x 2 micro-steps).
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT
from .helpers import assert_base_held_as_uninterrupted, rounds_config, run_command, run_worker, run_worker_many

pytestmark = [pytest.mark.dist, pytest.mark.slow]
NPROC = 3
GLOBAL_ROWS = 6


def _cfg(tiny_dir, out, backend: str, nproc: int, **checkpoint) -> dict:
    return rounds_config(tiny_dir, out, backend, GLOBAL_ROWS // nproc, **checkpoint)


@pytest.fixture(scope="module")
def one(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uneven-one")
    return run_worker(_cfg(tiny_dir, tmp / "run", "replicated", 1), 1, tmp)[0], tmp / "run/checkpoints"


@pytest.fixture(scope="module", params=["fsdp2", "zero3"])
def three(request, tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"uneven-{request.param}")
    ranks = run_worker(_cfg(tiny_dir, tmp / "run", request.param, NPROC), NPROC, tmp)
    return request.param, ranks, tmp / "run/checkpoints"


def test_three_ranks_match_one_process_through_a_round_and_the_prune_event(three, one):
    _, ranks, _ = three
    ref, _ = one
    assert [r["torch_dist_world_size"] for r in ranks] == [NPROC] * NPROC
    assert all(abs(a - b) > 1e-6 for a, b in zip(ranks[0]["local_losses"], ranks[2]["local_losses"], strict=True))
    assert len({r["params_digest"] for r in ranks}) == 1 and len({r["gates_digest"] for r in ranks}) == 1
    assert [(x["k"], x["rank"], x["kept"]) for x in ranks[0]["rounds_log"]] == [
        (x["k"], x["rank"], x["kept"]) for x in ref["rounds_log"]
    ]
    assert ranks[0]["kept"] == ref["kept"] and all(r["removed_alive"] == 0 for r in ranks)
    for a, b in zip(ref["losses"], ranks[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (ref["losses"], ranks[0]["losses"])
    # Really sharded: the base is split 3 ways (the padded last shard makes it a little more).
    total, local = ranks[0]["base_total_bytes"], [r["base_local_bytes"] for r in ranks]
    assert max(local) < total / NPROC * 1.1 and sum(local) >= total


@pytest.fixture(scope="module")
def resumed(three, tiny_dir, tmp_path_factory):
    """step -> the 3-rank run resumed from its step-3 and step-5 checkpoints (one launch)."""
    backend, _, ckpts = three
    tmp = tmp_path_factory.mktemp(f"uneven-resumed-{backend}")
    steps = (3, 5)
    cfgs = [_cfg(tiny_dir, tmp / str(s), backend, NPROC, resume_from=str(ckpts / f"step-{s:08d}")) for s in steps]
    return dict(zip(steps, run_worker_many(cfgs, NPROC), strict=True))


@pytest.mark.parametrize("step", [3, 5], ids=["between-rounds", "after-prune"])
def test_resume_on_three_ranks_is_bitwise(three, resumed, step):
    """Step 3: 7 adapters at rank 8 (after the round), the Adam state written back into
    padded ZeRO-3 partitions and FSDP2's uneven row shards; step 5: the K kept adapters
    after the prune event."""
    _, ranks, _ = three
    again = resumed[step]
    assert again[0]["losses"] == ranks[0]["losses"][step:]
    assert {r["params_digest"] for r in again} == {ranks[0]["params_digest"]}
    assert again[0]["kept"] == ranks[0]["kept"]
    assert_base_held_as_uninterrupted(again, ranks)


def test_export_of_a_three_rank_checkpoint_equals_the_one_process_export(three, one, tmp_path):
    backend, _, ckpts = three
    exports = {}
    for name, folder in (("one", one[1]), (backend, ckpts)):
        out = tmp_path / f"export-{name}"
        if backend == "fsdp2":  # the command itself; under zero3 its main() in this process
            proc = run_command(
                [sys.executable, "-m", "wlora_dist.cli", "export", str(folder / "step-00000007"), "--out", str(out)],
                timeout=300,
                cwd=ROOT,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            from wlora_dist.cli import main

            assert main(["export", str(folder / "step-00000007"), "--out", str(out)]) == 0
        exports[name] = load_file(str(out / "adapter_model.safetensors"))
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert sorted(exports[backend]) == sorted(exports["one"]) and exports["one"]
    for key, value in exports[backend].items():
        assert value.shape == exports["one"][key].shape and value.numel() > 0
        torch.testing.assert_close(value, exports["one"][key], rtol=0, atol=1e-4)
