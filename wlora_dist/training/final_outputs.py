"""What a run leaves at its end: the final selection report, every rank's bytes in the
log, and the peft adapter (rank 0 writes; every rank takes part in gathering sharded
adapters). (Whether the output folders are free is the preflight's check.)"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from typing import Any

from wlora_dist.checkpoint.peft import save_peft_adapter
from wlora_dist.distributed.base import Backend, base_bytes_by_dtype
from wlora_dist.distributed.env import DistEnv, barrier, gather_objects
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.resolved import ResolvedRun
from wlora_dist.training.report import write_report
from wlora_dist.training.tracking import RunLogger


@dataclass
class FinalRecord:
    """What the final report and the model card say besides the adapters themselves."""

    optimizer_step: int
    per_rank: dict[str, Any]  # this rank's figures: its bytes before / after the prune event, the prune seconds
    report_extra: dict[str, Any]  # the WeightLoRA+ rounds
    card: dict[str, Any] | None = None  # more model-card rows (rank 0): the launcher, the data, the final eval


def save_outputs(
    wl: WeightLoRA, backend: Backend, env: DistEnv, logger: RunLogger, run: ResolvedRun, final: FinalRecord
) -> None:
    """Collective: the selection report, every rank's bytes in the log, and the peft
    adapter (rank 0 writes; every rank takes part in gathering sharded adapters)."""
    adapter_dir, report_dir, optimizer_step = run.paths.adapter, run.paths.report, final.optimizer_step
    state = wl.export_state(backend.gather_full)
    ranks = gather_objects(
        {"global_rank": env.global_rank, **final.per_rank, "base_bytes": base_bytes_by_dtype(wl.peft_model)}
    )
    if env.is_main:
        extra = {
            "backend": backend.name,
            "world_size": env.world_size,
            "mesh": list(backend.spec.mesh_shape(env.world_size)),  # replicas x ranks sharing one base
            "memory_per_rank": ranks,
            **final.report_extra,
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
            **(final.card or {}),
        }
        save_peft_adapter(state, wl, adapter_dir, run.cfg.model.path, summary)
        logger.info("adapter (peft format) -> %s ; selection report -> %s", adapter_dir, report_dir)
    barrier()


def _bytes_summary(mem: dict[str, int]) -> str:
    return f"{mem.get('trainable_param_bytes', 0)}/{mem.get('optimizer_state_bytes', 0)}"
