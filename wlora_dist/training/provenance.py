"""Where a run came from, for its model card: the launcher and its command line, and the
data files with a fingerprint of each (so a card says which bytes an adapter was trained on)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

from wlora_dist.paths import looks_local


def _cmdline(pid: int) -> list[str]:
    """A process's command line (Linux /proc; empty elsewhere or when it has gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


_LAUNCHERS = {
    "accelerate": "accelerate launch",
    "accelerate.commands.launch": "accelerate launch",
    "deepspeed": "the deepspeed launcher",
    "deepspeed.launcher.launch": "the deepspeed launcher",
    "deepspeed.launcher.runner": "the deepspeed launcher",
    "torchrun": "torchrun",
    "torch.distributed.run": "torchrun",
    "srun": "srun",
}


def _launcher_of(cmd: list[str]) -> str | None:
    """The launcher a command line runs: its program (srun, a console script), or the
    script or ``-m`` module a Python interpreter runs (not any word in its arguments)."""
    program = os.path.basename(cmd[0]) if cmd else ""
    if program.startswith("python"):
        args = [a for a in cmd[1:] if a not in ("-u", "-O", "-B")]
        if args[:1] == ["-m"] and len(args) > 1:
            return _LAUNCHERS.get(args[1])
        return _LAUNCHERS.get(os.path.basename(args[0])) if args else None
    return _LAUNCHERS.get(program)


def launcher_description() -> str:
    """'accelerate launch: `accelerate launch --config_file ... train.py ...`': the
    launchers among this process's ancestors, outermost first, each once (the deepspeed
    launcher and accelerate run helper processes of their own), with a SLURM job's id;
    'one process: ...' for a plain process."""
    found: list[tuple[str, list[str]]] = []
    pid = os.getppid()
    for _ in range(5):  # worker <- torchrun agent <- accelerate / deepspeed <- srun <- shell
        cmd = _cmdline(pid)
        if not cmd:
            break
        name = _launcher_of(cmd)
        if name:
            found = [(n, c) for n, c in found if n != name] + [(name, cmd)]  # the outermost of each kind
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    words = [f"{name}: `{shlex.join(_short(cmd))}`" for name, cmd in reversed(found)]
    if not words:
        words = [f"one process: `{shlex.join(_short(_cmdline(os.getpid()) or [sys.executable, *sys.argv]))}`"]
    if os.environ.get("SLURM_JOB_ID"):
        words.append(f"SLURM job {os.environ['SLURM_JOB_ID']} ({os.environ.get('SLURM_JOB_NUM_NODES', '?')} nodes)")
    return "; ".join(words)


def _short(cmd: list[str]) -> list[str]:
    """``python /venv/bin/accelerate launch ...`` as ``accelerate launch ...``; otherwise
    the interpreter's path reduced to its name."""
    if len(cmd) > 1 and os.path.basename(cmd[1]) in ("accelerate", "deepspeed", "torchrun"):
        return [os.path.basename(cmd[1]), *cmd[2:]]
    return [os.path.basename(cmd[0]), *cmd[1:]] if cmd else cmd


def data_fingerprints(sources: list[str]) -> list[str]:
    """One line per data source: a local file's size and SHA-256, a saved dataset's
    fingerprint (datasets' own), a hub id as given."""
    out = []
    for source in sources:
        path = Path(os.path.expanduser(source))
        if not looks_local(source):
            out.append(f"`{source}` (hub dataset)")
        elif path.is_file():
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            out.append(f"`{path.resolve()}` ({path.stat().st_size} bytes, sha256 {digest[:16]})")
        elif path.is_dir():
            prints = [json.loads(s.read_text()).get("_fingerprint", "?") for s in sorted(path.rglob("state.json"))]
            out.append(f"`{path.resolve()}` (saved dataset, fingerprint {', '.join(prints) or '?'})")
        else:
            out.append(f"`{source}`")
    return out
