"""Hooks into the training loop, for tools and users (benchmarks count bytes here; a user
might freeze some adapters, or log more). Subclass ``Callback`` and override what you need;
``trainer`` is the running Trainer, of which a callback reads what ``LoopView`` names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from wlora_dist.config import RunConfig
    from wlora_dist.distributed.base import Backend
    from wlora_dist.distributed.env import DistEnv
    from wlora_dist.method.selector import LayoutEvent, Selector
    from wlora_dist.method.weight_lora import WeightLoRA


class LoopView(Protocol):
    """What a callback reads of the trainer (the Trainer has these and more)."""

    env: DistEnv
    wl: WeightLoRA  # the model with its adapters and gates
    backend: Backend  # the trainable parameters (backend.params) and the optimizer
    selector: Selector  # set once the backend has wrapped the model

    @property
    def cfg(self) -> RunConfig: ...


class Callback:
    def on_adapters_attached(self, trainer: LoopView, wl: WeightLoRA) -> None:
        """Adapters and gates are on the model, before the backend wraps it (the place to
        change the adapter set: ``wl.remove(...)``, or ``wl.remove_gates()`` for plain LoRA)."""

    def on_optimizer_step_end(self, trainer: LoopView, optimizer_step: int) -> None:
        """After the optimizer step, before the gradients are released."""

    def on_layout_change(self, trainer: LoopView, event: LayoutEvent) -> None:
        """After a WeightLoRA+ round, the prune event or a resume changed the adapters."""
