"""Activation offloading (``train.offload_activations``): what autograd saves for backward goes
to host memory as the forward saves it, and comes back when backward needs it. With
activation checkpointing what is saved is each checkpointed layer's input (torch's
non-reentrant checkpoint saves them through the same hooks), so a rank keeps one layer's
activations on the device at a time.

Written here with torch's saved-tensor hooks because none of the field's dependencies does
it for an arbitrary model: DeepSpeed's CPU checkpointing belongs to its own checkpoint
function, and torch's ``save_on_cpu`` copies every saved tensor, parameters included (each
layer's weights would cross to the host every step), on the compute stream.

On a GPU the device-to-host copy runs on a side stream into pinned memory, overlapped with
the forward; backward's copy back waits for it. On CPU the saved tensor is copied into a
separate host tensor, so the path runs (and is tested for values) where nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MIN_BYTES = 1 << 16  # smaller tensors (masks, positions, norms' scalars) stay where they are


@dataclass
class _OnHost:
    device: torch.device
    host: torch.Tensor
    copied: torch.cuda.Event | None  # the side stream's copy, on a GPU


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager for the forward: every saved tensor of at least ``min_bytes`` that is
    not a parameter (frozen weights are saved by reference; FSDP2 and ZeRO gather them
    again) is held in host memory until backward. ``moved_bytes`` / ``moved``: what went
    (for logs and tests)."""

    def __init__(self, min_bytes: int = MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self.moved_bytes = 0
        self.moved: list[tuple[int, ...]] = []  # shapes of the tensors sent to the host
        self._stream: torch.cuda.Stream | None = None
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _OnHost:
        size = t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) or size < self.min_bytes or t.layout != torch.strided:
            return t
        self.moved_bytes += size
        self.moved.append(tuple(t.shape))
        if t.device.type != "cuda":
            return _OnHost(t.device, t.detach().clone(), None)
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)  # dense, as torch's save_on_cpu packs
        self._stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self._stream)  # its memory is not reused before the copy is done
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return _OnHost(t.device, host, copied)

    @staticmethod
    def _unpack(packed: torch.Tensor | _OnHost) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.copied is None:
            return packed.host
        torch.cuda.current_stream(packed.device).wait_event(packed.copied)
        return packed.host.to(packed.device, non_blocking=True)
