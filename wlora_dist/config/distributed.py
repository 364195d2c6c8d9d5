"""distributed.*: the backend (replicated, FSDP2, DeepSpeed ZeRO) and its settings."""

from __future__ import annotations

from typing import Annotated, Literal

from wlora_dist.config.fields import Float, Section, check, field


class FSDPConfig(Section):
    reshard_after_forward: bool = field(
        True, "Free gathered parameters after forward (less memory, one more all-gather)."
    )
    cpu_offload: bool = field(False, "Keep sharded parameters, gradients and optimizer state in CPU memory.")
    mixed_precision: Literal["bf16", "no"] = field("bf16", "On GPU: bf16 compute copies, fp32 gradient reduction.")


class ZeROConfig(Section):
    stage: Annotated[int, check(lambda v: v in (1, 2, 3), "must be 1, 2 or 3")] = field(
        2, "ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters, base included)."
    )
    offload_optimizer: bool = field(False, "Keep optimizer state in CPU memory.")
    offload_params: bool = field(False, "Keep parameters in CPU memory (stage 3).")
    config_file: str = field("", "Your own DeepSpeed JSON; its values win over ours except where they are 'auto'.")

    def problems(self) -> list[str]:
        if self.offload_params and self.stage != 3:
            return ["distributed.zero.offload_params: needs distributed.zero.stage=3"]
        return []


class DistributedConfig(Section):
    backend: Literal["auto", "replicated", "fsdp2", "zero"] = field(
        "auto",
        "auto: what `accelerate launch --config_file` chose (FSDP -> fsdp2, DEEPSPEED -> zero), else replicated; "
        "replicated: every rank holds the model, adapter grads all-reduced; fsdp2: torch FSDP2 shards "
        "base and adapters; zero: DeepSpeed ZeRO (distributed.zero.stage).",
    )
    fsdp: FSDPConfig = field(FSDPConfig, "torch FSDP2 (distributed.backend fsdp2).")
    zero: ZeROConfig = field(ZeROConfig, "DeepSpeed ZeRO (distributed.backend zero).")
    timeout_minutes: Annotated[Float, check(lambda v: v > 0, "must be > 0")] = field(
        30.0, "Collective timeout: a dead rank fails the others after this long."
    )
