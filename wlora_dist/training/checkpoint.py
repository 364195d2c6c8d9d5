"""Checkpoints: atomic, sharded as the backend shards, resumable exactly or on another
world size, and never unpickled.

One checkpoint is a folder ``<checkpoint dir>/step-00000120/``::

    meta.json               step, phase (selection / pruned), kept adapters, data position,
                            world size, what the run was (for the compatibility check), and
                            the peft adapter config (``wlora-dist export`` needs nothing else)
    state/*.safetensors     adapters, their AdamW state, the gates: written by
                            torch.distributed.checkpoint (DCP), every rank its own shards
                            (FSDP2 DTensors; replicated / gathered tensors once); loading
                            reshards to any world size and any backend
    rng/rank-00000.safetensors  each rank's torch RNG states (dropout)

DCP's default storage pickles its metadata; we use its HuggingFace safetensors storage,
which keeps the sharding offsets in the safetensors headers, so loading a checkpoint runs
no pickle. The folder is written as ``step-00000120.tmp`` and renamed once every rank has
finished, after rank 0 has flushed every file to the disk and recorded each one's size and
SHA-256 in meta.json (written last): a crash leaves at worst a ``.tmp`` folder, never a
half-written checkpoint under a good name, and a checkpoint damaged later (a truncated or
altered file) is recognised (``verify``): ``resume_from: auto`` falls back to the newest
intact one, an explicit path is refused. The newest ``keep_last`` are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from wlora_dist.distributed.env import DistEnv, barrier, gather_objects
from wlora_dist.errors import UserError

_STEP_RE = re.compile(r"^step-(\d{8})$")
log = logging.getLogger("wlora_dist")


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or written by a different run."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp`` folders are not)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_resume(resume_from: str, root: Path) -> Path | None:
    """The checkpoint to resume from: '' none, 'auto' the newest intact one if any, 'latest'
    the newest intact one (an error if none), or a checkpoint folder (refused if damaged).
    A damaged newer checkpoint is skipped with a warning, naming what is wrong with it."""
    if not resume_from:
        return None
    if resume_from in ("auto", "latest"):
        ckpts = list_checkpoints(root)
        damaged = []
        for path in reversed(ckpts):
            problem = verify(path)
            if problem is None:
                for bad, why in damaged:
                    log.warning("checkpoint %s is damaged (%s): resuming from %s instead", bad, why, path.name)
                return path
            damaged.append((path.name, problem))
        if damaged:
            raise CheckpointError(
                f"checkpoint.resume_from={resume_from}: every checkpoint in {root} is damaged ("
                + "; ".join(f"{name}: {why}" for name, why in damaged)
                + "); start over with output.overwrite=true or point checkpoint.dir at intact ones"
            )
        if resume_from == "auto":
            return None
        raise CheckpointError(
            f"checkpoint.resume_from=latest: no checkpoint in {root}; start without it (resume_from='') "
            "or use resume_from=auto, which starts fresh when there is none"
        )
    path = Path(resume_from).expanduser()
    if not (path / "meta.json").is_file():
        hint = f"; complete ones in {path}: {[p.name for p in list_checkpoints(path)]}" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint.resume_from={resume_from!r}: not a checkpoint folder (no meta.json){hint}")
    check_intact(path)
    return path


def check_intact(path: Path) -> None:
    """Refuse a damaged checkpoint, naming what is wrong and the intact ones beside it."""
    problem = verify(path)
    if problem is not None:
        others = [p.name for p in list_checkpoints(path.parent) if p != path and verify(p) is None]
        hint = f"; intact ones beside it: {others}" if others else ""
        raise CheckpointError(f"{path} is damaged ({problem}){hint}")


def verify(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` (None: every file it lists is there
    with the size and SHA-256 recorded when it was written). Checkpoints written before
    the file list existed are taken as they are."""
    try:
        data = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"meta.json unreadable: {e}"
    files = data.get(FILES_KEY)
    if not isinstance(files, dict):
        return None
    for name, (size, digest) in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


FILES_KEY = "files"  # meta.json: {relative path: [bytes, sha256]} of every other file


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (a rename is durable only then)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class CheckpointMeta:
    """meta.json of a checkpoint: what training, resume and ``wlora-dist export`` share.

    Versioned by ``FORMAT`` (written as "format"); a checkpoint of another format is
    refused with a clear message rather than misread."""

    step: int  # the optimizer step it was written after
    pruned: bool  # after the prune event (the gates frozen)
    kept: list[str]  # adapter names present, in site order
    ranks: dict[str, int]  # LoRA rank of each kept adapter (WeightLoRA+ doubles them)
    rounds_log: list[dict[str, Any]]  # WeightLoRA+ rounds done so far
    rows_consumed: int  # training rows of the global batch consumed (data position)
    world_size: int
    backend: str  # BackendSpec.name of the run that wrote it
    identity: dict[str, Any]  # what a resuming run must share with it (run_identity)
    adapter_config: dict[str, Any]  # the peft LoraConfig of the kept adapters, as JSON
    time: float = 0.0  # wall clock at writing

    FORMAT: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> CheckpointMeta:
        if data.get("format") != cls.FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {data.get('format')!r}, this version reads {cls.FORMAT}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n != "time"]
        if missing:
            raise CheckpointError(f"{path}: meta.json lacks {missing}; the checkpoint is damaged")
        return cls(**{n: data[n] for n in names if n in data})

    @property
    def sites(self) -> list[str]:
        """Every adapter site of the run (index i <-> gate w[i])."""
        return list(self.identity["sites"])


def read_meta(path: Path) -> CheckpointMeta:
    try:
        data = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read meta.json ({e}); the checkpoint is damaged") from None
    return CheckpointMeta.from_dict(data, path)


def check_compatible(meta: CheckpointMeta, identity: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another model / adapter layout / selection, naming the field."""
    problems = []
    for key, ours in identity.items():
        theirs = meta.identity.get(key)
        if theirs != ours:
            shown_t = theirs if len(repr(theirs)) < 120 else f"{len(theirs)} entries"
            shown_o = ours if len(repr(ours)) < 120 else f"{len(ours)} entries"
            problems.append(f"{key}: checkpoint {shown_t!r}, this run {shown_o!r}")
    if problems:
        raise CheckpointError(
            f"{path} was written by a different run:\n  - "
            + "\n  - ".join(problems)
            + "\nresume with the config it was written with (saved as config.json next to meta.json) "
            "or use a new output.dir / checkpoint.dir"
        )


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
        files[str(file.relative_to(tmp))] = [file.stat().st_size, _sha256(file)]
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
