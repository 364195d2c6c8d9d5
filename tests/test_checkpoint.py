"""Checkpoints and faults, for real on gloo processes: exact resume at any phase, resume on
another world size, SIGTERM, a rank SIGKILLed, and export from any checkpoint.

"Stopped at step s and resumed" is tested by resuming from the step-s checkpoint that an
uninterrupted run wrote on its way (what a stopped run would have written), and, for
the signals, by really stopping a run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import (
    WORKER,
    assert_base_held_as_uninterrupted,
    dist_config,
    free_port,
    run_command,
    run_worker,
    run_worker_many,
    start,
    stop,
)

pytestmark = pytest.mark.dist


def _ckpt_cfg(tiny_dir, out, backend, nproc, dropout=0.1, **checkpoint):
    cfg = dist_config(tiny_dir, out, backend, 8 // nproc)
    # The shipped recipes use dropout: resume on the same world size must stay bitwise with it.
    # Comparisons across world sizes run without (each rank draws its own dropout masks).
    cfg["adapter"]["lora_dropout"] = dropout
    cfg["checkpoint"] = checkpoint
    return cfg


FULL = [  # (backend, dropout) of the uninterrupted runs; ZeRO-3 last (one launch)
    ("replicated", 0.1),
    ("replicated", 0.0),
    ("fsdp2", 0.1),
    ("fsdp2", 0.0),
    ("zero2", 0.1),
    ("zero3", 0.1),
    ("zero3", 0.0),
]


@pytest.fixture(scope="module")
def full_runs(tiny_dir, tmp_path_factory):
    """Uninterrupted 2-rank runs that checkpoint every step, per backend and dropout, and one
    replicated run that does not checkpoint ("plain"): all in one launch."""
    tmp = tmp_path_factory.mktemp("full")
    cfgs = [_ckpt_cfg(tiny_dir, tmp / f"{b}-{d}", b, 2, d, every=1, keep_last=20) for b, d in FULL]
    cfgs.insert(-2, _ckpt_cfg(tiny_dir, tmp / "plain", "replicated", 2))
    results = run_worker_many(cfgs, 2)
    plain = results.pop(-3)
    runs = {
        key: ({**ranks[0], "ranks": ranks}, tmp / f"{key[0]}-{key[1]}" / "checkpoints")
        for key, ranks in zip(FULL, results, strict=True)
    }
    runs["plain", 0.1] = ({**plain[0], "ranks": plain}, tmp / "plain" / "checkpoints")

    def get(backend: str, dropout: float = 0.1) -> tuple[dict, Path]:
        return runs[backend, dropout]

    return get


# In the selection phase under replicated and ZeRO-3 (the hardest: partitioned gates'
# optimizer), after the prune under replicated, at the prune step under FSDP2 and ZeRO-2.
RESUMES = [("replicated", 3), ("replicated", 7), ("fsdp2", 5), ("zero2", 5), ("zero3", 3)]


@pytest.fixture(scope="module")
def resumed(full_runs, tiny_dir, tmp_path_factory):
    """Each of RESUMES resumed from its step's checkpoint of the uninterrupted run: one launch."""
    tmp = tmp_path_factory.mktemp("resumed")
    cfgs = [
        _ckpt_cfg(tiny_dir, tmp / f"{b}-{s}", b, 2, resume_from=str(full_runs(b)[1] / f"step-{s:08d}"))
        for b, s in RESUMES
    ]
    return dict(zip(RESUMES, run_worker_many(cfgs, 2), strict=True))


@pytest.mark.parametrize(("backend", "step"), RESUMES, ids=[f"{b}-step{s}" for b, s in RESUMES])
def test_resume_is_bitwise_the_uninterrupted_run(backend, step, full_runs, resumed):
    full, ckpts = full_runs(backend)
    meta = json.loads((ckpts / f"step-{step:08d}" / "meta.json").read_text())
    assert meta["pruned"] == (step >= 5) and meta["world_size"] == 2
    assert len(meta["kept"]) == (5 if step >= 5 else 14)
    again = resumed[backend, step]
    assert again[0]["losses"] == full["losses"][step:]  # the steps after the checkpoint, bitwise
    assert {r["params_digest"] for r in again} == {full["params_digest"]}
    assert {r["gates_digest"] for r in again} == {full["gates_digest"]}
    assert again[0]["kept"] == full["kept"]
    assert_base_held_as_uninterrupted(again, full["ranks"])


def test_checkpointing_does_not_change_the_run(full_runs):
    full, ckpts = full_runs("replicated")
    plain, _ = full_runs("plain")
    assert plain["params_digest"] == full["params_digest"] and plain["losses"] == full["losses"]
    # keep_last: 20 > 8 steps, all kept; every folder complete, no .tmp left.
    assert [p.name for p in sorted(ckpts.iterdir())] == [f"step-{s:08d}" for s in range(1, 9)]


def test_resume_on_another_world_size_2_to_4_and_4_to_2(full_runs, tiny_dir, tmp_path):
    """FSDP2 shards resharded by the checkpoint loader: 2 -> 4 ranks from the prune step,
    then that run's own 4-rank checkpoint back on 2 ranks."""
    full, ckpts = full_runs("fsdp2", 0.0)
    cfg4 = _ckpt_cfg(tiny_dir, tmp_path / "four", "fsdp2", 4, 0.0, resume_from=str(ckpts / "step-00000005"), every=1)
    four = run_worker(cfg4, 4, tmp_path)
    assert four[0]["world_size"] == 4 and four[0]["kept"] == full["kept"]
    # Resumed on 4 ranks, each holds half what a rank of the 2-rank run held (its rows of
    # the base: vocabulary rows split unevenly, hence the tolerance).
    for key in ("base_resident_after_setup", "base_resident_bytes"):
        two_ranks = max(r[key] for r in full["ranks"])
        assert all(abs(r[key] - two_ranks / 2) <= 0.03 * two_ranks for r in four), key
    assert len({r["params_digest"] for r in four}) == 1
    for a, b in zip(four[0]["losses"], full["losses"][5:], strict=True):
        assert abs(a - b) < 1e-4
    back = tmp_path / "four" / "checkpoints" / "step-00000007"
    assert json.loads((back / "meta.json").read_text())["world_size"] == 4
    two = run_worker(_ckpt_cfg(tiny_dir, tmp_path / "two", "fsdp2", 2, 0.0, resume_from=str(back)), 2, tmp_path)
    assert two[0]["kept"] == full["kept"]
    assert_base_held_as_uninterrupted(two, full["ranks"])
    for a, b in zip(two[0]["losses"], full["losses"][7:], strict=True):
        assert abs(a - b) < 1e-4


def test_export_from_checkpoints_of_every_backend_equals_the_one_process_run(full_runs, tiny_dir, tmp_path):
    """`wlora-dist export` of the step-7 checkpoint: full trained tensors (never empty
    ZeRO-3 / FSDP2 shards), equal across backends and to the 1-process run's."""
    one = _ckpt_cfg(tiny_dir, tmp_path / "one", "replicated", 1, 0.0, every=7)
    run_worker(one, 1, tmp_path)
    exports = {}
    for name, ckpt in [
        ("one", tmp_path / "one/checkpoints/step-00000007"),
        *[(b, full_runs(b, 0.0)[1] / "step-00000007") for b in ("replicated", "fsdp2", "zero3")],
    ]:
        out = tmp_path / f"export-{name}"
        if name == "one":  # the command itself once; the others through its main() in this process
            _cli("export", str(ckpt), "--out", str(out))
        else:
            from wlora_dist.cli import main

            assert main(["export", str(ckpt), "--out", str(out)]) == 0
        exports[name] = load_file(str(out / "adapter_model.safetensors"))
        config = json.loads((out / "adapter_config.json").read_text())
        assert len(config["target_modules"]) == 5 and len(exports[name]) == 10
    for name, state in exports.items():
        assert sorted(state) == sorted(exports["one"]), name
        for key, value in state.items():
            assert value.numel() > 0 and value.shape == exports["one"][key].shape
            torch.testing.assert_close(value, exports["one"][key], rtol=0, atol=1e-4)


def test_export_merged_weights_compute_what_base_plus_adapter_computes(full_runs, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, ckpts = full_runs("replicated")
    _cli("export", str(ckpts), "--out", str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged"))
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "model"))
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # An existing output is not replaced without --overwrite.
    proc = _cli("export", str(ckpts), "--out", str(tmp_path / "adapter"), check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_command([sys.executable, "-m", "wlora_dist.cli", *args], timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- signals and faults


def _long_cfg(tiny_dir, out, **checkpoint):
    cfg = _ckpt_cfg(tiny_dir, out, "replicated", 2, **checkpoint)
    cfg["train"].update(max_steps=60)
    cfg["selection"].update(steps=10, project_every=10)
    return cfg


def _start(cfg: dict, log: Path) -> subprocess.Popen:
    out = Path(cfg["output"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.json").write_text(json.dumps(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKER),
        str(out / "cfg.json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return start(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if f"step {step}/" in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and b"dist_worker" in (d / "cmdline").read_bytes():
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_sigusr1_sigterm_and_ctrl_c_request_a_stop():
    """SLURM's --signal=USR1@T reaches the ranks as SIGUSR1, Ctrl-C as SIGINT: the same stop
    as SIGTERM."""
    from wlora_dist.checkpoint.schedule import StopOnSignal

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        stopper = StopOnSignal()
        stopper.install()
        try:
            assert not stopper.requested(torch.device("cpu"))
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
            assert stopper.requested(torch.device("cpu")) and stopper.received == sig
        finally:
            stopper.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return run_worker(_long_cfg(tiny_dir, tmp / "run", every=5), 2, tmp)[0]


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_the_same(uninterrupted, tiny_dir, tmp_path):
    """SIGTERM to the launcher (what SLURM / a scheduler sends): torchrun forwards it, every
    rank finishes its step, one checkpoint is written, the job ends without an adapter;
    `resume_from: auto` then ends with bitwise the uninterrupted run's adapter."""
    log = tmp_path / "log.txt"
    cfg = _long_cfg(tiny_dir, tmp_path / "run", every=5, resume_from="auto")
    proc = _start(cfg, log)
    try:
        _wait_for_step(log, 13, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    text = log.read_text()
    assert "stop signal received: checkpoint of step" in text, text[-3000:]
    ckpts = sorted((tmp_path / "run/checkpoints").iterdir())
    stopped_at = json.loads((ckpts[-1] / "meta.json").read_text())["step"]
    assert 13 <= stopped_at < 60 and not (tmp_path / "run/adapter").exists()
    assert not any(p.name.endswith(".tmp") for p in ckpts)
    resumed = run_worker(cfg, 2, tmp_path)
    assert resumed[0]["losses"] == uninterrupted["losses"][stopped_at:]
    assert resumed[0]["params_digest"] == uninterrupted["params_digest"]


def test_a_rank_killed_does_not_hang_the_others_and_the_run_resumes(uninterrupted, tiny_dir, tmp_path):
    """SIGKILL one rank mid-run: the other must not wait forever (gloo sees the peer gone;
    torchrun tears the job down), no half-written checkpoint appears, and resuming from the
    last complete one ends with bitwise the uninterrupted run's adapter."""
    log = tmp_path / "log.txt"
    cfg = _long_cfg(tiny_dir, tmp_path / "run", every=5, resume_from="auto")
    cfg["distributed"]["timeout_minutes"] = 1.0
    proc = _start(cfg, log)
    try:
        _wait_for_step(log, 12, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        t0 = time.time()
        proc.wait(timeout=180)
        assert proc.returncode != 0 and time.time() - t0 < 180
    finally:
        stop(proc)
    ckpts = [p for p in (tmp_path / "run/checkpoints").iterdir() if (p / "meta.json").is_file()]
    assert ckpts and not (tmp_path / "run/adapter").exists()
    resumed = run_worker(cfg, 2, tmp_path)
    assert resumed[0]["params_digest"] == uninterrupted["params_digest"]
    assert resumed[0]["losses"] == uninterrupted["losses"][60 - len(resumed[0]["losses"]) :]


def test_the_key_scheme_is_one_namespace_per_stateful_part():
    """checkpoint/keys.py names every tensor: the backend's adapter weights and AdamW state,
    the selector's gates; the same tensor objects (a load fills them in place)."""
    import torch

    from wlora_dist.checkpoint import keys

    w, m, v, s, g = (torch.zeros(2) for _ in range(5))
    a_name, b_name = keys.matrix_names("model.layers.0.self_attn.q_proj")
    assert (a_name, b_name) == ("model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B")
    flat = keys.flatten({a_name: {"weight": w, "exp_avg": m, "exp_avg_sq": v, "step": s}}, {"gates": g})
    assert list(flat) == [
        f"adapter.{a_name}",
        f"optim.{a_name}.exp_avg",
        f"optim.{a_name}.exp_avg_sq",
        f"optim.{a_name}.step",
        "wlora.gates",
    ]
    assert flat[f"adapter.{a_name}"] is w and flat["wlora.gates"] is g and keys.GATES == "wlora.gates"
