"""WeightLoRA+ (selection.rounds): halve K, project first, then double the kept ranks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from wlora_dist.config import ConfigError, config_from_dict
from wlora_dist.distributed.env import init_distributed
from wlora_dist.method.extension import double_rank
from wlora_dist.training.trainer import Trainer

from .conftest import tiny_config_dict
from .helpers import (
    assert_base_held_as_uninterrupted,
    assert_export_reproduces_the_model,
    dist_config,
    run_worker,
    run_worker_many,
)
from .helpers import train_in_process as _train


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("how", ["smart", "dummy"])
def test_extension_doubles_the_rank_and_keeps_the_product(how):
    a, b = torch.randn(4, 32, generator=_gen(1)), torch.randn(16, 4, generator=_gen(2))
    a2, b2 = double_rank(a, b, how, _gen(3))
    assert a2.shape == (8, 32) and b2.shape == (16, 8)
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=1e-5, atol=1e-5)
    assert torch.all(b2[:, 4:] == 0)  # the new directions start silent
    a3, b3 = double_rank(a, b, how, _gen(3))
    assert torch.equal(a2, a3) and torch.equal(b2, b3)  # same seed, same values: every rank agrees
    if how == "smart":  # orthonormal rows: the old span and a random orthogonal complement
        torch.testing.assert_close(a2 @ a2.T, torch.eye(8), rtol=0, atol=1e-5)


def test_restart_extension_and_limits():
    a2, b2 = double_rank(torch.randn(4, 32), torch.randn(16, 4), "restart", _gen())
    assert a2.shape == (8, 32) and torch.all(b2 == 0)
    with pytest.raises(ValueError, match="2r > in"):
        double_rank(torch.randn(20, 32), torch.randn(16, 20), "smart", _gen())


def _plus_run(tiny_dir, tmp_path, **selection):
    sel = {"steps": 6, "rounds": 3, "project_every": 1, **selection}
    return _train(tiny_dir, tmp_path, selection=sel, train={"max_steps": 9})


@pytest.mark.inprocess
def test_rounds_halve_k_double_ranks_keep_the_output_and_reset_adam(tiny_dir, tmp_path):
    trainer, result = _plus_run(tiny_dir, tmp_path)
    log = trainer.layout.record.rounds_log
    assert [(r["round"], r["step"], r["k"], r["rank"]) for r in log] == [(1, 2, 7, 8), (2, 4, 3, 16), (3, 6, 1, 32)]
    for r in log:  # "smart": the model output does not jump at an extension (or the removal)
        assert abs(r["probe_loss_before"] - r["probe_loss_after"]) < 1e-5, r
    # Each round's kept set is taken from the previous one (projection first, then extend).
    assert set(log[1]["kept"]) <= set(log[0]["kept"]) and set(log[2]["kept"]) <= set(log[1]["kept"])
    assert result.kept == log[-1]["kept"]
    # Adam state of the extended adapters was reset at the last round: 3 steps since.
    steps = {float(st["step"]) for st in trainer.backend.optimizer.state.values()}
    assert steps == {3.0}
    # The adapter parameter budget stays the same: 14 x r4 vs 1 x r32 of the widest kind.
    a, b = trainer.wl.adapter_params(trainer.wl.kept_sites()[0])
    assert a.shape[0] == b.shape[1] == 32
    # The report shows every round.
    report = json.loads((tmp_path / "run/report/selection-final.json").read_text())
    assert [r["k"] for r in report["rounds"]] == [7, 3, 1]
    assert (tmp_path / "run/report/selection-round1.json").is_file()


@pytest.mark.inprocess
def test_export_of_per_module_ranks_loads_with_peft_and_reproduces_the_model(tiny_dir, tmp_path):
    trainer, _ = _plus_run(tiny_dir, tmp_path, rounds=2, steps=4)
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    kept = trainer.wl.kept_sites()
    assert len(kept) == 3 and config["r"] == 4
    assert config["rank_pattern"] == {s.name: 16 for s in kept}
    assert config["alpha_pattern"] == {s.name: 32.0 for s in kept}  # alpha/r kept: 8/4 = 32/16
    state = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    assert {t.shape[0] for k, t in state.items() if "lora_A" in k} == {16}
    assert_export_reproduces_the_model(trainer, tiny_dir / "model", tmp_path / "run/adapter")


@pytest.mark.inprocess
def test_rounds_config_errors(tiny_dir, tmp_path):
    for sel, needle in [
        ({"rounds": 2, "method": "simplex"}, "needs selection.method=topk"),
        ({"rounds": 4, "steps": 6}, "must divide selection.steps=6"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            config_from_dict(tiny_config_dict(tiny_dir, tmp_path, selection=sel))
    cfg = config_from_dict(
        tiny_config_dict(tiny_dir, tmp_path / "r", selection={"rounds": 4, "steps": 8}, train={"max_steps": 9})
    )
    with pytest.raises(ConfigError, match="reach rank 64"):
        Trainer(cfg, init_distributed()).setup()


PLUS_CASES = [("fsdp2", 2), ("zero3", 2), ("fsdp2", 4)]  # and on 3 ranks (FSDP2, ZeRO-3): tests/test_uneven_world.py


def _plus_cfg(tiny_dir, out, backend, nproc):
    cfg = dist_config(tiny_dir, out, backend, 8 // nproc)
    cfg["selection"].update(steps=4, rounds=2)
    return cfg


@pytest.fixture(scope="module")
def plus_reference(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plus-ref")
    return run_worker(_plus_cfg(tiny_dir, tmp / "one", "replicated", 1), 1, tmp)[0]


@pytest.fixture(scope="module")
def plus_runs(tiny_dir, tmp_path_factory):
    """nproc -> backend -> (rank records, run folder): one launch per world size, ZeRO-3 last."""
    done: dict[int, dict] = {}

    def get(nproc: int) -> dict:
        if nproc not in done:
            backends = sorted((b for b, n in PLUS_CASES if n == nproc), key=lambda b: b == "zero3")
            tmp = tmp_path_factory.mktemp(f"plus{nproc}")
            cfgs = []
            for backend in backends:
                cfg = _plus_cfg(tiny_dir, tmp / backend, backend, nproc)
                if backend == "fsdp2" and nproc == 2:
                    cfg["checkpoint"] = {"every": 1, "keep_last": 20}
                cfgs.append(cfg)
            runs = run_worker_many(cfgs, nproc)
            done[nproc] = {b: (r, tmp / b) for b, r in zip(backends, runs, strict=True)}
        return done[nproc]

    return get


@pytest.mark.dist
@pytest.mark.parametrize(("backend", "nproc"), PLUS_CASES, ids=[f"{b}-{n}ranks" for b, n in PLUS_CASES])
def test_rounds_under_sharding_match_one_process(backend, nproc, plus_reference, plus_runs, tiny_dir, tmp_path):
    """The adapters change shape twice: FSDP2 re-shards them as new units, ZeRO rebuilds
    its engine; every rank ends bitwise equal, and the run matches 1 process."""
    ranks, run_dir = plus_runs(nproc)[backend]
    ref = plus_reference
    assert [r["torch_dist_world_size"] for r in ranks] == [nproc] * nproc
    assert len({r["params_digest"] for r in ranks}) == 1 and len({r["gates_digest"] for r in ranks}) == 1
    for r in ranks:
        assert [(x["k"], x["rank"], x["kept"]) for x in r["rounds_log"]] == [
            (x["k"], x["rank"], x["kept"]) for x in ref["rounds_log"]
        ]
        assert all(abs(x["probe_loss_before"] - x["probe_loss_after"]) < 1e-5 for x in r["rounds_log"])
        assert r["removed_alive"] == 0  # the last round's old (rank-8) and dropped tensors are freed
    for a, b in zip(ref["losses"], ranks[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (ref["losses"], ranks[0]["losses"])
    if backend == "fsdp2" and nproc == 2:
        # Resume between the rounds (step 3: 7 adapters at rank 8): bitwise the same end.
        resume = _plus_cfg(tiny_dir, tmp_path / "resumed", backend, nproc)
        resume["checkpoint"] = {"resume_from": str(run_dir / "checkpoints/step-00000003")}
        resumed = run_worker(resume, nproc, tmp_path)
        assert resumed[0]["params_digest"] == ranks[0]["params_digest"]
        assert resumed[0]["losses"] == ranks[0]["losses"][3:]
        assert_base_held_as_uninterrupted(resumed, ranks)
