"""Where a run writes. Refused up front when an earlier run's work is there; at the end:
the selection report, every rank's bytes in the log, and the peft adapter (rank 0 writes;
every rank takes part in gathering sharded adapters)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from wlora_dist.config import RunConfig
from wlora_dist.distributed.base import Backend, base_bytes_by_dtype
from wlora_dist.distributed.env import DistEnv, barrier, gather_objects
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.training.checkpoint import list_checkpoints
from wlora_dist.training.export import save_peft_adapter
from wlora_dist.training.report import write_report
from wlora_dist.training.results import TrainingError
from wlora_dist.training.tracking import RunLogger


def check_output_free(cfg: RunConfig, adapter_dir: Path, ckpt_root: Path, resumes: bool) -> None:
    """Refuse, before anything is loaded or written, a run whose folders cannot be made
    (a file where a folder must go, no permission to write), or that would replace an
    earlier run's adapter or (starting fresh) its checkpoints, unless output.overwrite says so."""
    check_folder(adapter_dir.parent, "output.dir")
    check_folder(ckpt_root, "checkpoint.dir" if cfg.checkpoint.dir else "output.dir")
    if cfg.output.overwrite:
        return
    if adapter_dir.exists():
        raise TrainingError(
            f"{adapter_dir} already holds an adapter; choose another output.dir or set "
            "output.overwrite=true (the old one is replaced only after the new one is complete)"
        )
    earlier = [] if resumes else list_checkpoints(ckpt_root)
    if earlier:
        raise TrainingError(
            f"{ckpt_root} holds checkpoints of an earlier run ({earlier[-1].name} the newest); resume it with "
            "checkpoint.resume_from=auto, start over with output.overwrite=true (they are replaced as new ones "
            "are written), or choose another output.dir / checkpoint.dir"
        )


def check_folder(folder: Path, field: str) -> None:
    """``folder`` can be made (or is one) and written to: every existing part of its path is
    a folder, and the deepest existing one is writable."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise TrainingError(f"{field}: {existing} is a file, not a folder; choose another {field}")
    if not os.access(existing, os.W_OK):
        raise TrainingError(f"{field}: {existing} is not writable; choose another {field} or fix its permissions")


def save_outputs(
    wl: WeightLoRA,
    backend: Backend,
    env: DistEnv,
    logger: RunLogger,
    adapter_dir: Path,
    report_dir: Path,
    model_path: str,
    optimizer_step: int,
    per_rank: dict[str, Any],
    report_extra: dict[str, Any],
    card: dict[str, Any] | None = None,
) -> None:
    """Collective. ``per_rank``: this rank's figures for the final report (its bytes
    before / after the prune event, the prune seconds); ``card``: more rows for the model
    card (the launcher, the data, the final eval)."""
    state = wl.export_state(backend.gather_full)
    ranks = gather_objects(
        {"global_rank": env.global_rank, **per_rank, "base_bytes": base_bytes_by_dtype(wl.peft_model)}
    )
    if env.is_main:
        extra = {
            "backend": backend.name,
            "world_size": env.world_size,
            "mesh": list(backend.spec.mesh_shape(env.world_size)),  # replicas x ranks sharing one base
            "memory_per_rank": ranks,
            **report_extra,
        }
        write_report(wl, report_dir, optimizer_step, "final", extra)
        for r in ranks:
            logger.info(
                "rank %d: frozen base %s",
                r["global_rank"],
                ", ".join(f"{v / 2**20:.2f} MiB {k}" for k, v in sorted(r["base_bytes"].items())),
            )
            if "before" in r and "after" in r:
                logger.info(
                    "rank %d: trainable/optimizer bytes %s -> %s, prune %.3f s",
                    r["global_rank"],
                    _bytes_summary(r["before"]),
                    _bytes_summary(r["after"]),
                    r["prune_seconds"],
                )
        summary = {
            "selection": f"top-K = {int(wl.kept.sum())} of n = {wl.n}" if int(wl.kept.sum()) < wl.n else "none",
            "optimizer steps": optimizer_step,
            "backend": f"{backend.name}, world size {env.world_size}",
            "command": "`" + " ".join(shlex.quote(a) for a in sys.argv) + "`",
            **(card or {}),
        }
        save_peft_adapter(state, wl, adapter_dir, model_path, summary)
        logger.info("adapter (peft format) -> %s ; selection report -> %s", adapter_dir, report_dir)
    barrier()


def _bytes_summary(mem: dict[str, int]) -> str:
    return f"{mem.get('trainable_param_bytes', 0)}/{mem.get('optimizer_state_bytes', 0)}"
