"""memory.* and output.*: the memory budget the run plans for, and where it writes."""

from __future__ import annotations

from typing import Annotated

from wlora_dist.config.fields import Float, Section, at_least, field


class MemoryConfig(Section):
    replan_at_prune: bool = field(
        False,
        "At the prune event, when model.gradient_checkpointing is on and the memory plan (wlora-dist plan) says "
        "the K kept adapters fit memory.budget_gib without it, switch it off, else checkpoint the fewest layers "
        "that fit (model.checkpoint_every_n_layers): the same math, a faster step.",
    )
    budget_gib: Annotated[Float, at_least(0)] = field(
        0.0, "Memory per rank the plan may use; 0 = the GPU's total memory (CPU runs: set it)."
    )
    reserve_gib: Annotated[Float, at_least(0)] = field(
        2.0, "Left out of the budget: CUDA context, NCCL buffers, allocator fragmentation."
    )


class OutputConfig(Section):
    dir: str = field("runs/default", "Run folder: adapter/, report/, logs/.")
    overwrite: bool = field(False, "Allow replacing an existing adapter in output.dir.")
    reports: bool = field(
        True, "Write the selection report (JSON + gate heatmap) at the prune event and each WeightLoRA+ round."
    )
