"""Ulysses sequence parallelism's building blocks (distributed/sequence_parallel.py): a
micro-batch split into chunks that train exactly what the whole sequence does, and the
attention that gathers the sequence for a share of the heads."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from wlora_dist.distributed.sequence_parallel import document_mask, shard_batch
from wlora_dist.distributed.spec import check_heads

from .conftest import ROOT
from .helpers import free_port, run_command


def test_chunks_join_into_the_padded_sequence_with_labels_shifted_across_them():
    ids = torch.arange(1, 15).view(2, 7)
    labels = ids.clone()
    labels[0, :2] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    chunks = [shard_batch(batch, 4, r, pad_id=0) for r in range(4)]  # 7 tokens -> 8, chunks of 2
    joined = {k: torch.cat([c[k] for c in chunks], dim=1) for k in ("input_ids", "position_ids", "shift_labels")}
    assert joined["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0], [8, 9, 10, 11, 12, 13, 14, 0]]
    assert joined["position_ids"].tolist() == [list(range(8))] * 2  # the sequence's, not the chunk's
    # The label of a chunk's last token is the first token of the next chunk.
    assert joined["shift_labels"].tolist() == [[-100, 3, 4, 5, 6, 7, -100, -100], [9, 10, 11, 12, 13, 14, -100, -100]]
    assert all(int(c["num_items_in_batch"]) == 11 for c in chunks)  # the whole micro-batch's trained tokens
    assert all(c["labels"] is c["shift_labels"] for c in chunks)


def test_packed_rows_keep_their_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    mask = document_mask(pos)
    assert mask is not None and mask.shape == (2, 1, 5, 5)
    assert mask[0, 0, 3].tolist() == [False, False, False, True, False]  # the second document starts fresh
    assert mask[1, 0].equal(torch.ones(5, 5, dtype=torch.bool).tril())
    assert document_mask(torch.arange(6).expand(2, 6)) is None  # one sequence per row: causal is the mask


def test_heads_the_ranks_cannot_share_are_named():
    assert check_heads(32, 8, 4) is None and check_heads(32, 8, 16) is None  # 8 kv heads copied to 16 ranks
    assert "32 attention heads cannot be split over 3 ranks" in check_heads(32, 8, 3)
    assert "6 key/value heads" in check_heads(24, 6, 4)


@pytest.mark.launched
def test_n_ranks_sharing_a_sequence_train_what_one_process_does(tmp_path):
    """World 4, gloo: N = 2 (two groups) and N = 4 (grouped-query attention's 2 key/value heads
    copied to 4 ranks), on right-padded rows of a length neither divides and on packed rows:
    the chunks' losses add up to the one-process loss and their gradients to its gradients,
    and what a rank saves for backward (counted by saved-tensor hooks) is 1/N of the one
    process's, once the padding to a multiple of N is counted (within 10%: the key/value
    heads copied at N = 4, the packed rows' mask)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={free_port()}"]
    proc = run_command([*cmd, str(ROOT / "tests/sequence_parallel_worker.py"), str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(4):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {(r["batch"], r["n"]) for r in results} == {(b, n) for b in ("rows", "packed") for n in (2, 4)}
        for r in results:
            assert abs(r["loss"] - r["ref"]) < 1e-5, r
            assert r["grad_diff"] < 1e-5, r
            width = {"rows": 13, "packed": 14}[r["batch"]]
            padded = -(-width // r["n"]) * r["n"] / width
            share = r["saved_bytes"] * r["n"] / r["ref_saved_bytes"] / padded
            assert 0.95 < share < 1.1, (r, share)


@pytest.fixture(scope="module")
def sequence_runs(tiny_dir, tmp_path_factory):
    """The trainer on a world of 4 with distributed.sequence_parallel 2 (2 data x 2 sequence:
    FSDP2, HSDP, FSDP2 on the NF4 base, ZeRO-3) and 4 (every rank a quarter of each row:
    FSDP2, ZeRO-3 on the 8-bit base), and a checkpoint of the FSDP2 sequence-parallel-2 run
    resumed without sequence parallelism, all in one launch; and the one-process runs on
    the same global batch (8 rows x 2 micro-steps) with each base."""
    from .helpers import dist_config, run_worker_many

    tmp = tmp_path_factory.mktemp("sequence-parallel")

    def config(name: str, backend: str, n: int, quantization: str = "none", **checkpoint: object) -> dict:
        cfg = dist_config(tiny_dir, tmp / name, backend, 8 // (4 // n), quantization)
        cfg["distributed"]["sequence_parallel"] = n
        cfg["checkpoint"] = {**cfg.get("checkpoint", {}), **checkpoint}
        return cfg

    hsdp = config("fsdp2-hsdp-2", "fsdp2", 2)
    hsdp["distributed"]["fsdp"] = {"shard_size": 2}  # 2 replicas x shard groups of 2, and 2 ranks per sequence
    runs = {
        ("fsdp2", 2): config("fsdp2-2", "fsdp2", 2, every=4),
        ("fsdp2", 4): config("fsdp2-4", "fsdp2", 4),
        ("fsdp2-hsdp", 2): hsdp,
        ("fsdp2-nf4", 2): config("fsdp2-nf4-2", "fsdp2", 2, "nf4"),  # the 4-bit base, sharded
        ("zero3", 2): config("zero3-2", "zero3", 2),  # ZeRO-3 last: its zero.Init outlives the run
        ("zero3-int8", 4): config("zero3-int8-4", "zero3", 4, "int8"),  # the 8-bit base, partitioned
    }
    resumed = config("resumed", "fsdp2", 1, resume_from=str(tmp / "fsdp2-2" / "checkpoints" / "step-00000004"))
    cfgs = list(runs.values())
    records = run_worker_many([*cfgs[:4], resumed, *cfgs[4:]], 4)
    found = dict(zip(runs, records[:4] + records[5:], strict=True))
    refs = [dist_config(tiny_dir, tmp / f"reference-{q}", "replicated", 8, q) for q in ("none", "nf4", "int8")]
    references = dict(zip(("none", "nf4", "int8"), (r[0] for r in run_worker_many(refs, 1)), strict=True))
    return found, records[4], references


CASES = [("fsdp2", 2), ("fsdp2", 4), ("fsdp2-hsdp", 2), ("fsdp2-nf4", 2), ("zero3", 2), ("zero3-int8", 4)]


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-sp{c[1]}")
def test_the_trainer_with_ranks_sharing_sequences_trains_what_one_process_does(sequence_runs, case):
    runs, _, references = sequence_runs
    ranks = runs[case]
    reference = references[next((q for q in ("nf4", "int8") if case[0].endswith(q)), "none")]
    assert [r["world_size"] for r in ranks] == [4] * 4
    assert len({r["gates_digest"] for r in ranks}) == 1  # the gates bitwise equal on every rank
    assert all(r["kept"] == reference["kept"] for r in ranks)  # the same kept set
    for a, b in zip(reference["losses"], ranks[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (reference["losses"], ranks[0]["losses"])
    # The ranks of a group see one sequence's chunks: their losses (N times a chunk's share)
    # differ; the groups of sequence parallel 2 read different rows.
    n = case[1]
    assert ranks[0]["local_losses"] != ranks[1]["local_losses"]
    assert len({r["params_digest"] for r in ranks}) == 1
    _assert_sharded_as_without(ranks, shard=2 if case[0] == "fsdp2-hsdp" else 4)
    for r in ranks:  # the prune event frees the dropped adapters' optimizer state on every rank
        assert r["memory"]["after"]["optimizer_state_bytes"] < r["memory"]["before"]["optimizer_state_bytes"]
    if n == 2:
        assert ranks[0]["local_losses"] != ranks[2]["local_losses"]


@pytest.mark.dist
def test_a_checkpoint_of_ranks_sharing_sequences_resumes_without_them(sequence_runs):
    """Saved at step 4 with 2 ranks per sequence (2 data ranks), resumed with every rank on
    its own rows (4 data ranks, the same global batch): the run goes on as it would have."""
    runs, resumed, _ = sequence_runs
    before = runs["fsdp2", 2][0]
    assert resumed[0]["world_size"] == 4 and len(resumed[0]["losses"]) == 5  # steps 5 to 9
    for a, b in zip(before["losses"][4:], resumed[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (before["losses"], resumed[0]["losses"])
    assert resumed[0]["kept"] == before["kept"] and len({r["gates_digest"] for r in resumed}) == 1
    _assert_sharded_as_without(resumed, shard=4)  # the resume gathered nothing of the base


def _assert_sharded_as_without(ranks: list[dict], shard: int) -> None:
    """Sharing sequences changes nothing of what a rank holds of the base: 1/shard of it
    (FSDP2 and ZeRO-3 over the 4 ranks; HSDP over its group of 2), and nothing more."""
    total = ranks[0]["base_total_bytes"]
    for r in ranks:
        assert abs(r["base_local_bytes"] - total / shard) <= 0.02 * total, (r["base_local_bytes"], total)
        assert r["base_resident_bytes"] == r["base_local_bytes"]


def test_the_plan_gives_each_rank_its_share_of_a_long_sequence():
    """The planner: a rank sharing each sequence with N - 1 others keeps 1/N of the
    activations (70B, 4-bit base, 32k tokens, checkpointing: 41 GiB alone, 5.1 GiB with 8);
    at 64k tokens an 8B run fits 80 GiB only with sequence parallelism, and --recommend says
    so, fewest ranks per sequence first."""
    from dataclasses import replace

    from wlora_dist.distributed.spec import BackendSpec
    from wlora_dist.planning.memory_plan import PlanInput, plan
    from wlora_dist.planning.search import recommend, sequence_parallel_sizes
    from wlora_dist.planning.sources import PRESETS

    inp = PlanInput(PRESETS["llama3-70b"], world_size=8, base="nf4", seq_len=32768)
    inp = replace(inp, activation_checkpointing=True, loss_shards=8)
    alone, shared = plan(inp), plan(replace(inp, backend=BackendSpec("fsdp2", sequence_parallel=8)))
    assert abs(shared.before.activations * 8 / alone.before.activations - 1) < 1e-6
    assert shared.before.base == alone.before.base  # the weights are sharded as before
    long = PlanInput(PRESETS["llama3-8b"], world_size=8, seq_len=65536)
    assert sequence_parallel_sizes(long) == [1, 2, 4, 8]  # 32 heads, 8 key/value heads
    assert sequence_parallel_sizes(replace(long, seq_len=2048)) == [1]
    found = recommend(long)
    assert found and all("sequence parallel" in words for words, _ in found)
    assert found[0][0].startswith("fsdp2 + sequence parallel 2")


def test_ranks_that_cannot_share_the_sequence_are_refused_before_anything_loads(tiny_dir, tmp_path, monkeypatch):
    """The tiny Llama has 4 heads and 2 key/value heads: 3 ranks per sequence cannot share
    them, and 3 does not divide a world of 4; both are said before any weight is read."""
    from wlora_dist.config import config_from_dict
    from wlora_dist.resolved import resolve_run
    from wlora_dist.training.preflight import preflight_problems

    from .helpers import tiny_config_dict

    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run", distributed={"sequence_parallel": 3}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    _, problems, _ = preflight_problems(resolve_run(cfg))
    assert any("distributed.sequence_parallel: 3 does not divide the 4 ranks" in p for p in problems), problems
    assert any("distributed.sequence_parallel: 4 attention heads cannot be split over 3 ranks" in p for p in problems)
