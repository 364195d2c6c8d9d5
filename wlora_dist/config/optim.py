"""optim.*: AdamW over the adapters and its learning-rate schedule."""

from __future__ import annotations

from typing import Annotated, Literal

from wlora_dist.config.fields import Float, FloatList, Section, at_least, check, field, in_unit


class OptimConfig(Section):
    lr: Annotated[Float, at_least(0)] = field(3e-4, "Peak AdamW learning rate of the adapters.")
    weight_decay: Annotated[Float, at_least(0)] = field(0.0, "AdamW weight decay.")
    betas: Annotated[
        FloatList, check(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")
    ] = field([0.9, 0.999], "AdamW betas.")
    eps: Float = field(1e-8, "AdamW epsilon.")
    loraplus_lr_ratio: Annotated[Float, at_least(0)] = field(
        1.0,
        "LoRA+: the learning rate of every lora_B is optim.lr times this (the LoRA+ paper suggests 16); 1 = plain "
        "LoRA. FSDP2 and the replicated backend (not DeepSpeed ZeRO, whose engine owns the parameter groups).",
    )
    max_grad_norm: Annotated[Float, at_least(0, "0 disables clipping")] = field(
        1.0, "Clip the adapters' gradient norm to this; 0 disables."
    )
    warmup_steps: Annotated[int, at_least(0)] = field(0, "Linear warmup steps.")
    warmup_ratio: Annotated[Float, in_unit()] = field(
        0.0, "> 0: warmup steps as this fraction of the run instead of warmup_steps."
    )
    schedule: Literal["cosine", "linear", "constant"] = field("cosine", "LR decay after warmup.")
    min_lr_ratio: Annotated[Float, in_unit(closed=True)] = field(
        0.0, "Final LR as a fraction of the peak (cosine/linear)."
    )
