"""Hooks into the training loop, for tools and users (benchmarks count bytes here; a user
might freeze some adapters, or log more). Subclass ``Callback`` and override what you need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wlora_dist.method.selector import LayoutEvent
    from wlora_dist.method.weight_lora import WeightLoRA
    from wlora_dist.training.trainer import Trainer


class Callback:
    def on_adapters_attached(self, trainer: Trainer, wl: WeightLoRA) -> None:
        """Adapters and gates are on the model, before the backend wraps it (the place to
        change the adapter set: ``wl.remove(...)``, or ``wl.remove_gates()`` for plain LoRA)."""

    def on_optimizer_step_end(self, trainer: Trainer, optimizer_step: int) -> None:
        """After the optimizer step, before the gradients are released."""

    def on_layout_change(self, trainer: Trainer, event: LayoutEvent) -> None:
        """After a WeightLoRA+ round, the prune event or a resume changed the adapters."""
