"""The SLURM scripts, run for real with stand-in sbatch / srun / scontrol (tests/slurm_shims)
on PATH: the scripts' own logic (rendezvous from the node list, node rank from
SLURM_NODEID, one launcher per node, the signal trap, requeue, resume) is what runs.

Two "nodes" (two launchers with node ranks 0 and 1 on this machine) x 2 processes must
train exactly like one node with 4 processes.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, tiny_config_dict
from .helpers import free_port, run_command, start, stop

pytestmark = pytest.mark.e2e
SHIMS = ROOT / "tests" / "slurm_shims"
SLURM = ROOT / "launch" / "slurm"


def _cfg_file(tiny_dir: Path, tmp: Path, **sections) -> Path:
    cfg = tiny_config_dict(
        tiny_dir,
        tmp / "run",
        selection={"steps": 5, "k": 5, "project_every": 5},
        train={"max_steps": 9, "grad_accum_steps": 2, "micro_batch_size": 2},
        **sections,
    )
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{SHIMS}:{os.environ['PATH']}",
        "SHIM_STATE": str(tmp / "shim"),
        "WLORA_PYTHON": sys.executable,
        "WLORA_MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _sbatch(script: str, tmp: Path, env: dict, *args: str, wait: bool = True):
    cmd = ["sbatch", f"--output={tmp}/%x-%j.out", str(SLURM / script), *args]
    if not wait:
        return start(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    return run_command(cmd, timeout=900, env=env, cwd=ROOT)


def _metrics(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _wait_for(log: Path, text: str, job: subprocess.Popen, limit: float = 300) -> None:
    """Until ``text`` is in the job's log; fails if the job ends or ``limit`` seconds pass first."""
    t0 = time.time()
    while text not in (log.read_text() if log.exists() else ""):
        assert job.poll() is None and time.time() - t0 < limit, log.read_text()[-3000:] if log.exists() else ""
        time.sleep(0.05)


def test_scripts_are_valid_bash():
    for script in SLURM.iterdir():
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_two_nodes_of_two_train_exactly_like_one_node_of_four(tiny_dir, tmp_path):
    """multi_node.sbatch (2 nodes x 2, accelerate with the shipped multi-node FSDP2 config)
    against single_node.sbatch (1 node x 4, torchrun, FSDP2): same world size, same losses
    and bitwise the same adapter."""
    from safetensors.torch import load_file

    one = tmp_path / "one"
    one.mkdir()
    proc = _sbatch(
        "single_node.sbatch",
        one,
        _env(one, WLORA_NPROC_PER_NODE="4", SHIM_JOB_ID="41"),
        str(_cfg_file(tiny_dir, one)),
        "distributed.backend=fsdp2",
    )
    assert proc.returncode == 0, (one / "wlora-41.out").read_text()[-3000:]
    two = tmp_path / "two"
    two.mkdir()
    proc = _sbatch(
        "multi_node.sbatch",
        two,
        _env(two, WLORA_NPROC_PER_NODE="2", WLORA_LAUNCHER="accelerate", SHIM_JOB_ID="42"),
        str(_cfg_file(tiny_dir, two)),
    )
    log = (two / "wlora-42.out").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "2 node(s) x 2 process(es), accelerate, rendezvous 127.0.0.1" in log
    assert "world_size=4 backend=fsdp2" in log
    assert "world_size=4 backend=fsdp2" in (one / "wlora-41.out").read_text()
    assert _metrics(two / "run") == _metrics(one / "run") and len(_metrics(one / "run")) == 9
    a = load_file(str(one / "run/adapter/adapter_model.safetensors"))
    b = load_file(str(two / "run/adapter/adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)


def test_preemption_signal_checkpoints_requeues_and_the_requeued_job_resumes(tiny_dir, tmp_path):
    """SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@300): the trap passes SIGTERM to
    the job step, the ranks checkpoint and stop, the script asks for a requeue; the
    requeued job (same id, restart 1) resumes from that checkpoint and finishes."""
    cfg = _cfg_file(tiny_dir, tmp_path, checkpoint={"every": 0})
    data = yaml.safe_load(cfg.read_text())
    data["train"]["max_steps"] = 60
    data["selection"].update(steps=10, project_every=10)
    cfg.write_text(yaml.safe_dump(data))
    env = _env(tmp_path, WLORA_NPROC_PER_NODE="2", SHIM_JOB_ID="77")
    job = _sbatch("single_node.sbatch", tmp_path, env, str(cfg), wait=False)
    log = tmp_path / "wlora-77.out"
    try:
        _wait_for(log, "step 12/", job)
        os.kill(int((tmp_path / "shim/batch.pid").read_text()), signal.SIGUSR1)
        assert job.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop(job)
    text = log.read_text()
    assert "signal received: asking the trainer to checkpoint" in text
    assert "stop signal received: checkpoint of step" in text
    assert (tmp_path / "shim/scontrol.log").read_text() == "requeue 77\n"
    ckpts = sorted((tmp_path / "run/checkpoints").iterdir())
    assert len(ckpts) == 1 and not (tmp_path / "run/adapter").exists()
    step = json.loads((ckpts[0] / "meta.json").read_text())["step"]
    # SLURM runs the requeued job: same script, same id, restart count 1.
    env["SHIM_RESTART_COUNT"] = "1"
    env["WLORA_MASTER_PORT"] = str(free_port())
    proc = _sbatch("single_node.sbatch", tmp_path, env, str(cfg))
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "(restart 1)" in text and f"resumed from {ckpts[0]}: step {step}" in text
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    assert len(_metrics(tmp_path / "run")) == 60  # steps 1..step, then step+1..60, one log


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def test_hsdp_on_two_nodes_survives_a_node_failure_by_requeue(tiny_dir, tmp_path):
    """multi_node.sbatch with WLORA_SHARD_SIZE=node: 2 "nodes" x 2 processes, the base
    sharded within each node (mesh 2 x 2). One node dies mid-run (its launcher and ranks
    SIGKILLed): the other node's ranks fail within the collective timeout instead of
    hanging, the job exits non-zero; requeued (SLURM requeues a --requeue job on node
    failure), it resumes from the last complete checkpoint and ends with the adapter of an
    uninterrupted run, bitwise."""
    from safetensors.torch import load_file

    def cfg(folder: Path) -> Path:
        path = _cfg_file(tiny_dir, folder, checkpoint={"every": 2})
        data = yaml.safe_load(path.read_text())
        data["distributed"] = {"timeout_minutes": 1.0}
        path.write_text(yaml.safe_dump(data))
        return path

    whole = tmp_path / "whole"
    whole.mkdir()
    env = _env(whole, WLORA_NPROC_PER_NODE="2", WLORA_SHARD_SIZE="node", SHIM_JOB_ID="50")
    proc = _sbatch("multi_node.sbatch", whole, env, str(cfg(whole)), "distributed.backend=fsdp2")
    assert proc.returncode == 0, (whole / "wlora-50.out").read_text()[-3000:]
    assert "world_size=4 backend=fsdp2 mesh=2x2" in (whole / "wlora-50.out").read_text()

    env = _env(tmp_path, WLORA_NPROC_PER_NODE="2", WLORA_SHARD_SIZE="node", SHIM_JOB_ID="51")
    job = _sbatch("multi_node.sbatch", tmp_path, env, str(cfg(tmp_path)), "distributed.backend=fsdp2", wait=False)
    log = tmp_path / "wlora-51.out"
    try:
        _wait_for(log, "step 5/", job)
        for pid in _descendants(int((tmp_path / "shim/node1.pid").read_text())):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert job.wait(timeout=240) != 0, log.read_text()[-3000:]
    finally:
        stop(job)
    scontrol = tmp_path / "shim/scontrol.log"  # a node failure is not a preemption: no requeue asked
    assert not scontrol.exists() or "requeue" not in scontrol.read_text()
    done = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert done and all(not name.endswith(".tmp") for name in done), done
    env["SHIM_RESTART_COUNT"] = "1"
    env["WLORA_MASTER_PORT"] = str(free_port())
    proc = _sbatch("multi_node.sbatch", tmp_path, env, str(cfg(tmp_path)), "distributed.backend=fsdp2")
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"resumed from {tmp_path / 'run/checkpoints' / done[-1]}" in text, text[-3000:]
    a = load_file(str(whole / "run/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
