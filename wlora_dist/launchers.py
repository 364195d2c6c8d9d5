"""Honour the launcher's word: what an accelerate config chose at `accelerate launch`.

accelerate launch exports its config as environment variables (ACCELERATE_USE_FSDP,
FSDP_*, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_*, ACCELERATE_MIXED_PRECISION).
We read them into config overrides and apply FSDP2 / ZeRO ourselves: accelerate's own
FSDP plugin is never enabled without a GPU (FINDINGS.md), so it could not be tested here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _true(value: str | None) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def accelerate_overrides(env: Mapping[str, str]) -> list[tuple[str, Any]]:
    """Config overrides (dotted key, value) implied by an accelerate launch config."""
    out: list[tuple[str, Any]] = []
    if _true(env.get("ACCELERATE_USE_FSDP")):
        out.append(("distributed.backend", "fsdp2"))
        if "FSDP_RESHARD_AFTER_FORWARD" in env:
            # FSDP2 configs say true/false; FSDP1-style configs name a strategy.
            value = env["FSDP_RESHARD_AFTER_FORWARD"].lower()
            out.append(("distributed.fsdp.reshard_after_forward", value in ("true", "1", "full_shard")))
        if "FSDP_OFFLOAD_PARAMS" in env:
            out.append(("distributed.fsdp.cpu_offload", _true(env["FSDP_OFFLOAD_PARAMS"])))
        if _true(env.get("FSDP_ACTIVATION_CHECKPOINTING")):
            out.append(("model.gradient_checkpointing", True))
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        out.append(("distributed.backend", "zero"))
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            out.append(("distributed.zero.stage", int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])))
        for var, key in (
            ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "distributed.zero.offload_optimizer"),
            ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "distributed.zero.offload_params"),
        ):
            if var in env:
                out.append((key, env[var].lower() not in ("none", "", "false")))
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") not in (None, "", "None"):
            out.append(("distributed.zero.config_file", env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]))
    precision = env.get("ACCELERATE_MIXED_PRECISION")
    if precision in ("bf16", "no", "fp16"):
        out.append(("train.mixed_precision", precision))
    return out
