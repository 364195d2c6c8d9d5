"""Every rank holds the whole model; adapter gradients are averaged by one all-reduce.

Written by hand rather than with torch DDP: DDP's reducer keeps references to every
parameter it was built over, so after the prune event it would have to be torn down and
rebuilt to free the removed adapters; one flat all-reduce is all we need here.
"""

from __future__ import annotations

import torch
from torch import nn

from wlora_dist.distributed.base import Backend
from wlora_dist.distributed.env import all_reduce_mean_, broadcast_
from wlora_dist.method.weight_lora import WeightLoRA


class ReplicatedBackend(Backend):
    def _prepare(self, wl: WeightLoRA) -> nn.Module:
        self._materialize_if_meta(wl)
        wl.peft_model.to(self.env.device)
        self._module = wl.peft_model
        # Same seed on every rank gives the same init; the broadcast makes it a guarantee.
        with torch.no_grad():
            for p in wl.trainable_parameters():
                broadcast_(p.data, src=0)
        self.build_optimizer(wl.trainable_parameters())
        return wl.peft_model

    def reduce_gradients(self) -> None:
        if not self.env.distributed:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_mean_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
