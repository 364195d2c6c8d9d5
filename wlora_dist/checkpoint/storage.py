"""One checkpoint folder, written atomically and read back: the tensors every rank holds
(torch.distributed.checkpoint, DCP), each rank's RNG state, the run's config, and
meta.json with every file's size and SHA-256, written last. Loading reshards to any world
size and any backend, and never unpickles.

DCP's default storage pickles its metadata; we use its HuggingFace safetensors storage,
which keeps the sharding offsets in the safetensors headers, so loading a checkpoint runs
no pickle. The folder is written as ``step-00000120.tmp`` and renamed once every rank has
finished, after rank 0 has flushed every file to the disk and recorded each one's size and
SHA-256 in meta.json (written last): a crash leaves at worst a ``.tmp`` folder, never a
half-written checkpoint under a good name (folders.verify finds one damaged later). The
newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from wlora_dist.checkpoint.folders import FILES_KEY, CheckpointError, list_checkpoints, sha256_of, step_dir
from wlora_dist.checkpoint.meta import CheckpointMeta
from wlora_dist.distributed.env import DistEnv, barrier, gather_objects


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (a rename is durable only then)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    root: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    meta: CheckpointMeta,
    config: dict[str, Any],
    env: DistEnv,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it with its own tensors; returns the final folder.

    Every write is covered, on every rank: the folder, the shards (DCP; a rank that cannot
    write its own makes DCP fail on every rank), the RNG files, rank 0's metadata and
    rename. After each stage the ranks agree on whether any failed (one small all-gather):
    then the temporary folder is removed and every rank raises the same CheckpointError,
    naming the folder and the OS error (a full disk, a permission), earlier checkpoints
    untouched. No rank is left waiting in a collective the others abandoned."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")

    def stage(main_only: bool, write: Any) -> None:
        error = None if main_only and not env.is_main else _write_error(write)
        errors = [e for e in gather_objects(error) if e] if env.distributed else [error] if error else []
        if errors:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint, under any name
            barrier()
            raise CheckpointError(
                f"writing checkpoint {final} failed: {errors[0]}; free space or fix permissions there (or set "
                "checkpoint.dir elsewhere); earlier checkpoints are untouched"
            )

    stage(True, lambda: _make_tmp(tmp))
    stage(False, lambda: _save_shards(tmp / "state", tensors, env.distributed))
    stage(False, lambda: save_file(_rng_state(), str(tmp / "rng" / f"rank-{env.global_rank:05d}.safetensors")))
    stage(True, lambda: _finish(tmp, final, root, config, meta))  # every rank's shards are written
    if env.is_main:
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _save_shards(folder: Path, tensors: dict[str, torch.Tensor], distributed: bool) -> None:
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=distributed)
    dcp.save(tensors, storage_writer=writer, no_dist=not distributed)


def _make_tmp(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash: never complete, never read
    (tmp / "rng").mkdir(parents=True)


def _finish(tmp: Path, final: Path, root: Path, config: dict[str, Any], meta: CheckpointMeta) -> None:
    """Rank 0, once every rank's files are in ``tmp``: config, sizes and checksums, meta.json
    last, everything flushed, then the rename that makes the checkpoint count."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(file)  # every rank's shards, on the disk before the rename makes them count
        files[str(file.relative_to(tmp))] = [file.stat().st_size, sha256_of(file)]
    (tmp / "meta.json").write_text(json.dumps({**meta.to_dict(), FILES_KEY: files}, indent=2))  # last
    _fsync(tmp / "meta.json")
    for folder in (tmp / "state", tmp / "rng", tmp):
        _fsync(folder)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(root)


def _write_error(write: Any) -> str | None:
    """Run ``write``; None when it worked, else what went wrong in a line. DCP reports a
    failure on any rank as a CheckpointException (a BaseException) on every rank, holding
    each failed rank's exception; safetensors reports OS errors as its own error type."""
    try:
        write()
    except CheckpointException as e:
        rank, (exc, _) = sorted(e.failures.items())[0]
        return f"{_describe(exc)} (rank {rank})"
    except Exception as e:
        return _describe(e)
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def load_tensors(path: Path, tensors: dict[str, torch.Tensor], distributed: bool) -> None:
    """Fill ``tensors`` in place from the checkpoint (resharded to their layout)."""
    stored = _stored_shapes(path)  # reads every shard's header: once, not once per key
    missing = [k for k in tensors if k not in stored]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / "state")), no_dist=not distributed)
    except Exception as e:  # a shard safetensors cannot read: say which checkpoint, not a library traceback
        raise CheckpointError(f"{path}: cannot read its tensors ({type(e).__name__}: {e}); it is damaged") from None


def stored_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every stored tensor whose key starts with ``prefix``, assembled whole (one process;
    for ``wlora-dist export``)."""
    shapes = _stored_shapes(path)
    out = {k: torch.zeros(s, dtype=d) for k, (s, d) in shapes.items() if k.startswith(prefix)}
    dcp.load(out, storage_reader=HuggingFaceStorageReader(str(path / "state")), no_dist=True)
    return out


def _stored_shapes(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    try:
        md = HuggingFaceStorageReader(str(path / "state")).read_metadata()
    except Exception as e:  # a truncated shard header
        raise CheckpointError(f"{path}: cannot read its tensors ({type(e).__name__}: {e}); it is damaged") from None
    return {k: (v.size, v.properties.dtype) for k, v in md.state_dict_metadata.items()}  # type: ignore[union-attr]


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(path: Path, rank: int, fallback_seed: int) -> bool:
    """This rank's saved RNG state; on a world size the checkpoint did not have, a seed
    derived from (seed, rank, step) instead. Returns whether the saved state was used."""
    file = path / "rng" / f"rank-{rank:05d}.safetensors"
    if not file.is_file():
        torch.manual_seed(fallback_seed)
        return False
    state = load_file(str(file))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    return True
