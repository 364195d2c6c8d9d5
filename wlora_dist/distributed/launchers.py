"""Honour the launcher's word: what an accelerate config chose at `accelerate launch`.

accelerate launch exports its config as environment variables (ACCELERATE_USE_FSDP,
FSDP_*, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_*, ACCELERATE_MIXED_PRECISION).
We read them into config overrides and apply FSDP2 / ZeRO ourselves: accelerate's own
FSDP plugin is never enabled without a GPU (docs/measurements.md), so it could not be tested here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wlora_dist.errors import UserError


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
        out += _parallelism_overrides(env)
    elif _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        out += _parallelism_overrides(env, hsdp=False)
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


def _parallelism_overrides(env: Mapping[str, str], hsdp: bool = True) -> list[tuple[str, Any]]:
    """accelerate's ``parallelism_config`` (PARALLELISM_CONFIG_*): ``dp_replicate_size`` x
    ``dp_shard_size`` is HSDP (FSDP only), distributed.fsdp.shard_size here; ``sp_size`` is
    distributed.sequence_parallel (Ulysses, accelerate's DeepSpeed sequence parallelism).
    Tensor parallelism and torch's context parallelism (ring attention) are refused."""
    if not _true(env.get("ACCELERATE_USE_PARALLELISM_CONFIG")):
        return []
    others = {k: env.get(f"PARALLELISM_CONFIG_{k.upper()}", "1") for k in ("tp_size", "cp_size")}
    unsupported = [f"parallelism_config_{k}: {v}" for k, v in others.items() if v not in ("", "1", "None")]
    if unsupported:
        raise UserError(
            f"the accelerate config sets {', '.join(unsupported)}: wlora_dist shards the data (FSDP2 / HSDP / "
            "ZeRO) and shares long sequences with Ulysses (parallelism_config_sp_size); remove them, or use "
            "parallelism_config_sp_size for long sequences"
        )
    out: list[tuple[str, Any]] = []
    sp = int(env.get("PARALLELISM_CONFIG_SP_SIZE") or 1)
    if sp > 1:
        out.append(("distributed.sequence_parallel", sp))
    replicate = int(env.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE") or 1)
    shard = int(env.get("PARALLELISM_CONFIG_DP_SHARD_SIZE") or 1)
    if hsdp and replicate > 1:
        out.append(("distributed.fsdp.shard_size", shard))
    return out


def accelerate_config_env(config_file: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file config_file`` gives its processes
    (the variables above), computed by accelerate's own launch code: what ``wlora-dist plan
    --accelerate-config`` and the tests use to see the run a shipped config starts."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command sets it before its deepspeed launcher
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(
            fields + (["mixed_precision"] if mp_from_config else [])
        )
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_"))}


def lone_process_warning(env: Mapping[str, str], has_gpu: bool) -> str | None:
    """accelerate launch without a config file on a machine without a GPU starts ONE
    process whatever --num_processes says (its simple launcher), and exports nothing that
    says how many were asked for: say so when that is what happened."""
    launched_by_accelerate = "ACCELERATE_USE_CPU" in env or "ACCELERATE_MIXED_PRECISION" in env
    if launched_by_accelerate and "WORLD_SIZE" not in env and not has_gpu:
        return (
            "accelerate launch started a single process: without a GPU, accelerate needs a config file to start "
            "several (--config_file launch/accelerate/cpu_2proc.yaml, cpu_fsdp2.yaml or cpu_zero3.yaml; "
            "--num_processes alone is ignored). This run trains alone."
        )
    return None
