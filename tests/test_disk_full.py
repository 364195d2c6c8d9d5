"""A disk that fills while a checkpoint is written, and errors said once, through the
command users run (torchrun train.py, 2 ranks, FSDP2: every rank writes its own shards).

A real small filesystem (a tmpfs of 300 KiB, mounted where the tests may: root) fills
while the third checkpoint's shards are written; where no tmpfs can be mounted, the same
case runs with the full disk injected. Injected cases (tests/fault_injection) make one rank
alone fail: its shard file, which DCP reports on every rank, and its RNG file, which only
that rank sees (the ranks agree on it before going on). Each ends the same way: one
message naming the checkpoint folder and the OS error, printed once and shown by torchrun's
failure summary instead of a traceback, a non-zero exit, no temporary folder, the earlier
checkpoints intact, no adapter.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, tiny_config_dict
from .helpers import free_port, run_command

pytestmark = [pytest.mark.dist, pytest.mark.e2e]
FAULTS = ROOT / "tests" / "fault_injection"


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path | None]:
    """A tmpfs of ``size`` mounted at ``where`` (None where mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _train(tiny_dir: Path, tmp: Path, ckpt_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    cfg = tiny_config_dict(
        tiny_dir,
        tmp / "run",
        selection={"steps": 8, "project_every": 8},  # every checkpoint before the prune: same size
        train={"max_steps": 8, "micro_batch_size": 4},
        checkpoint={"every": 1, "keep_last": 20, "dir": str(ckpt_dir)},
        distributed={"backend": "fsdp2"},
    )
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env.update(WLORA_TEST_ENOSPC=fault, PYTHONPATH=f"{FAULTS}{os.pathsep}{env.get('PYTHONPATH', '')}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(ROOT / "train.py"),
        "--config",
        str(path),
    ]
    return run_command(cmd, timeout=600, env=env, cwd=ROOT)


def _assert_failed_cleanly(proc: subprocess.CompletedProcess, ckpt_dir: Path, step: int, tmp: Path) -> None:
    from wlora_dist.checkpoint.folders import list_checkpoints, verify

    out = proc.stdout + proc.stderr
    folder = ckpt_dir / f"step-{step:08d}"
    message = f"writing checkpoint {folder} failed: No space left on device"
    assert proc.returncode != 0, out[-3000:]
    # Said once on the console (rank 0), and torchrun's summary shows it for each failed
    # rank instead of "To enable traceback see ...".
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), out[-3000:]
    summary = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert f"traceback : {message}" in summary, proc.stderr[-3000:]
    assert "To enable traceback" not in proc.stderr and "CheckpointException" not in out
    # Nothing half-written; the earlier checkpoints intact; no adapter.
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [f"step-{s:08d}" for s in range(1, step)]
    assert all(verify(p) is None for p in list_checkpoints(ckpt_dir))
    assert not (tmp / "run" / "adapter").exists()


def test_a_real_disk_filling_while_shards_are_written(tiny_dir, tmp_path):
    """300 KiB hold two checkpoints (~130 KiB each); the third's shards do not fit."""
    with small_filesystem(tmp_path / "disk", "300k") as disk:
        if disk is None:
            ckpts = tmp_path / "ckpts"  # not root: the same case, the disk full injected at the shard writer
            proc = _train(tiny_dir, tmp_path, ckpts, fault="shards:0:3")
        else:
            ckpts = disk / "ckpts"
            proc = _train(tiny_dir, tmp_path, ckpts)
        _assert_failed_cleanly(proc, ckpts, 3, tmp_path)


@pytest.mark.parametrize(
    "fault",
    # Rank 1 alone: its shard file (DCP fails on every rank), its RNG file (only it knows).
    ["shards:1:2", "rng:1:2"],
    ids=["one-rank-shards", "one-rank-rng-file"],
)
def test_one_rank_alone_finding_the_disk_full(tiny_dir, tmp_path, fault):
    ckpts = tmp_path / "ckpts"
    proc = _train(tiny_dir, tmp_path, ckpts, fault=fault)
    _assert_failed_cleanly(proc, ckpts, 2, tmp_path)


def test_a_run_refused_on_every_rank_says_it_once(tiny_dir, tmp_path):
    """A fresh run over an earlier run's checkpoints, refused by every rank once the group is
    up: the message once on the console and in the launcher's summary, no traceback of
    ours, exit non-zero."""
    ckpts = tmp_path / "ckpts"
    (ckpts / "step-00000004").mkdir(parents=True)
    (ckpts / "step-00000004" / "meta.json").write_text("{}")
    proc = _train(tiny_dir, tmp_path, ckpts)
    message = f"{ckpts} holds checkpoints of an earlier run"
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), proc.stderr[-3000:]
    assert f"traceback : {message}" in proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert "To enable traceback" not in proc.stderr and "wlora_dist/" not in proc.stderr
