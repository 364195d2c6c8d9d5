"""Counting what a step's collectives move, as the process sees them: a torch dispatch mode
that records every c10d operation (FSDP2's, DeepSpeed's and the trainer's own all go
through these ops), its process group's ranks, the bytes of the whole tensor it gathers,
scatters or reduces, and whether it ran in forward or backward.

No library counts this per process group: the profiler names the ops but not the group,
and torch's CommDebugMode counts calls, not bytes per group. The bytes a rank moves are
then derived from each record the same way the planner's model does
(wlora_dist/planning/traffic.py, ``moved``), so the check compares what was called, on
which group and how large, with what the model predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# c10d op -> (planner's kind, which argument holds the whole tensor: its size is what the op moves)
_OPS = {
    "_allgather_base_": ("all_gather", 0),  # (output, input, group): output whole
    "allgather_": ("all_gather", 0),  # ([[outputs]], [input], group)
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input, ...): input whole
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
}


@dataclass(frozen=True)
class Collective:
    kind: str  # all_gather, reduce_scatter, all_reduce, broadcast
    ranks: tuple[int, ...]  # the process group's members (global ranks)
    nbytes: int  # the whole tensor (gathered output, scattered input, reduced buffer)
    backward: bool  # ran while autograd executed a backward pass


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for item in x for t in _tensors(item)]
    return []


class CollectiveLog(TorchDispatchMode):
    """``with CollectiveLog() as log: ...``; ``log.records`` then lists each collective."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__.split(".")[0]
        if func.namespace == "c10d" and name in _OPS:
            kind, arg = _OPS[name]
            group = next(a for a in args if isinstance(a, torch.ScriptObject))
            ranks = tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(group)))
            nbytes = sum(t.numel() * t.element_size() for t in _tensors(args[arg]))  # broadcast: the root's
            self.records.append(Collective(kind, ranks, nbytes, torch._C._current_graph_task_id() != -1))
        return func(*args, **(kwargs or {}))
