"""What DeepSpeed's ZeRO engine keeps that wlora_dist must reach, and the workarounds for
what its engine.destroy() leaves behind (0.19). Each is needed where DeepSpeed has no public
way; tests/test_private_apis.py names the private attributes these rely on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def zero3_local_slice(full: torch.Tensor, partition_numel: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of a ZeRO-3 parameter: the flat elements
    [rank * partition_numel, (rank + 1) * partition_numel), zero-filled past the end (the
    last ranks' padding when the world size does not divide the element count)."""
    flat = full.reshape(-1)
    out = torch.zeros(partition_numel, dtype=flat.dtype, device=flat.device)
    start = rank * partition_numel
    n = max(0, min(partition_numel, flat.numel() - start))
    if n:
        out[:n] = flat[start : start + n]
    return out


def partition_gathered(module: nn.Module | None) -> None:
    """Re-partition every ZeRO-3 parameter of ``module`` left gathered, through DeepSpeed's
    per-parameter ``partition``. At a layout change, where the module already holds the new
    (WeightLoRA+) adapters as plain parameters, which the engine's own
    ``empty_partition_cache`` cannot walk past."""
    if module is None:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE]
    for p in gathered:
        p.ds_active_sub_modules.clear()
    if gathered:
        gathered[0].partition(param_list=gathered)


def destroy_engine(engine: Any) -> None:
    """engine.destroy() removes the optimizer's gradient hooks and (stage 3) the module
    hooks, but (DeepSpeed 0.19) leaves four things that keep the old engine, and through
    it the removed adapters, alive and partly in use: its own forward hooks on the module,
    ZeRO-3's class-level release cache, ZeRO-3's per-module backward Functions, and its
    per-module registry of "external" parameters.
    Each was found by walking gc referrers from a removed lora_A weight; the tests prove
    the removed tensors freed (weak references dead) under every stage."""
    engine.destroy()
    clear_stage3_release_cache()
    # ZeRO-3 stores on every module, once ("if 'pre_bwd_fn' not in module.__dict__"),
    # autograd Function classes closing over the offload object that created them. A new
    # engine would reuse the old ones: its backward would drive the OLD coordinator, and
    # they keep the old engine, and through it the removed adapters, alive. Drop them so
    # the new engine makes its own.
    model = getattr(engine, "module", None)
    if model is not None:
        live = {id(p) for p in model.parameters()}
        for module in model.modules():
            for attr in ("pre_bwd_fn", "post_bwd_fn"):
                module.__dict__.pop(attr, None)
            # ZeRO-3 registers "dangling" parameters it sees in a module's forward output
            # on that module (_external_params) and never forgets them: a LoraLayer whose
            # adapter was replaced (WeightLoRA+) kept its old A / B alive that way.
            external = module.__dict__.get("_external_params")
            if external:
                for key in [k for k, v in external.items() if id(v) not in live]:
                    del external[key]
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()


def clear_stage3_release_cache() -> None:
    """ZeRO-3's PartitionedParameterCoordinator memoises ``__params_to_release`` with a
    class-level functools.lru_cache keyed by (coordinator, submodule): it keeps every
    module it has seen, removed adapters included, alive for the life of the process
    (found by walking gc referrers from a removed lora_A weight). Clearing it only
    costs a recomputation on the next step."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fn = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    # DeepSpeed wraps it in instrument_w_nvtx, a closure without __wrapped__: look inside.
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    for candidate in [fn, *cells]:
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()
            return
    raise RuntimeError("DeepSpeed's ZeRO-3 coordinator changed: cannot clear its module cache to free adapters")


def master_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, the tensors the inner optimizer steps.
    (Stage 3 detaches them from the inner optimizer's param_groups between steps.)"""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        if hasattr(zero_optimizer, attr):
            return list(getattr(zero_optimizer, attr))
    return [p for g in inner_optimizer(zero_optimizer).param_groups for p in g["params"]]


def inner_optimizer(zero_optimizer: Any) -> torch.optim.Optimizer:
    return getattr(zero_optimizer, "optimizer", zero_optimizer)


def adam_step(zero_optimizer: Any) -> torch.Tensor | None:
    for s in inner_optimizer(zero_optimizer).state.values():
        if "step" in s:
            return s["step"].clone() if isinstance(s["step"], torch.Tensor) else torch.tensor(float(s["step"]))
    return None
