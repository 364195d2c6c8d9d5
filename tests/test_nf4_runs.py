"""Whole runs on the 4-bit base with double quantisation (NF4, QLoRA's setting): ZeRO-1 and
ZeRO-2 (base replicated, each rank quantising it whole) through a WeightLoRA+ round and the
prune event against one process, and a ZeRO-2 resume between the rounds, bitwise. FSDP2
and ZeRO-3 on 2 and 3 ranks are cases of tests/test_distributed.py."""

import json

import pytest

from .helpers import assert_base_held_as_uninterrupted, rounds_config, run_worker

pytestmark = [pytest.mark.dist, pytest.mark.slow]
GLOBAL_ROWS = 8


def _cfg(tiny_dir, out, backend: str, nproc: int, **checkpoint) -> dict:
    cfg = rounds_config(tiny_dir, out, backend, GLOBAL_ROWS // nproc, "nf4-dq", **checkpoint)
    cfg["train"]["max_steps"] = 6
    return cfg


@pytest.fixture(scope="module")
def one(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nf4-one")
    return run_worker(_cfg(tiny_dir, tmp / "run", "replicated", 1), 1, tmp)[0]


@pytest.fixture(scope="module", params=["zero1", "zero2"])
def two(request, tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"nf4-{request.param}")
    ranks = run_worker(_cfg(tiny_dir, tmp / "run", request.param, 2), 2, tmp)
    return request.param, ranks, tmp / "run/checkpoints"


def test_zero1_and_zero2_on_nf4_match_one_process_through_a_round_and_the_prune_event(two, one):
    _, ranks, _ = two
    assert [r["torch_dist_world_size"] for r in ranks] == [2, 2] and one["quantization"] == "nf4-dq"
    assert all(r["quantization"] == "nf4-dq" for r in ranks)
    assert all(abs(a - b) > 1e-6 for a, b in zip(ranks[0]["local_losses"], ranks[1]["local_losses"], strict=True))
    assert len({r["params_digest"] for r in ranks}) == 1 and len({r["gates_digest"] for r in ranks}) == 1
    rounds = [(x["k"], x["rank"], x["kept"]) for x in one["rounds_log"]]
    assert len(rounds) == 2 and [(x["k"], x["rank"], x["kept"]) for x in ranks[0]["rounds_log"]] == rounds
    assert ranks[0]["kept"] == one["kept"] and all(r["removed_alive"] == 0 for r in ranks)
    for a, b in zip(one["losses"], ranks[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (one["losses"], ranks[0]["losses"])
    # ZeRO-1/2 partition the optimizer state, not the base: every rank holds the whole packed
    # base (uint8 codes and absmax codes), bitwise the one-process one.
    for r in ranks:
        assert r["int8"]["dtypes"] == ["torch.uint8"] and r["int8"]["local_bytes"] == r["int8"]["total_bytes"]
        assert (
            r["int8"]["digest"] == one["int8"]["digest"] and r["int8"]["nested_digest"] == one["int8"]["nested_digest"]
        )


def test_zero2_on_nf4_resumes_between_the_rounds_bitwise(two, tiny_dir, tmp_path):
    backend, ranks, ckpts = two
    if backend != "zero2":
        pytest.skip("one resume is enough: ZeRO-1 and ZeRO-2 share the checkpoint code")
    step = 3  # after the round at step 2 (K halved, ranks doubled), before the prune event
    meta = json.loads((ckpts / f"step-{step:08d}" / "meta.json").read_text())
    assert not meta["pruned"]
    cfg = _cfg(tiny_dir, tmp_path / "resumed", backend, 2, resume_from=str(ckpts / f"step-{step:08d}"))
    resumed = run_worker(cfg, 2, tmp_path)
    assert resumed[0]["losses"] == ranks[0]["losses"][step:]
    assert {r["params_digest"] for r in resumed} == {ranks[0]["params_digest"]}
    assert {r["gates_digest"] for r in resumed} == {ranks[0]["gates_digest"]}
    assert resumed[0]["kept"] == ranks[0]["kept"]
    assert_base_held_as_uninterrupted(resumed, ranks)
