"""Which checkpoints a folder holds, which of them are intact, and which one a run resumes
from (``checkpoint.resume_from``). Only the file system and meta.json are read here: the
resolved run asks before anything is loaded.

A checkpoint counts once its folder has its final name ``step-00000120`` and a meta.json,
which lists every other file with its size and SHA-256: ``verify`` finds a truncated or
altered file, ``resume_from: auto`` then falls back to the newest intact checkpoint and
an explicit path is refused."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

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
        if sha256_of(file) != digest:
            return f"{name} does not match its checksum"
    return None


FILES_KEY = "files"  # meta.json: {relative path: [bytes, sha256]} of every other file


def sha256_of(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
