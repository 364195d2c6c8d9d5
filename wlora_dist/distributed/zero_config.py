"""The DeepSpeed config a ZeRO run uses: our settings, the user's JSON over them, and the
sizes a memory-budgeted adapter trainer sets instead of DeepSpeed's defaults."""

from __future__ import annotations

from typing import Any

from torch import nn

from wlora_dist.distributed.settings import BackendSettings
from wlora_dist.distributed.spec import merge_deepspeed, zero_bucket_numel
from wlora_dist.model.blocks import decoder_layers


def deepspeed_config(settings: BackendSettings, limits: dict[str, int] | None = None) -> dict[str, Any]:
    """Our settings as a DeepSpeed config; the user's JSON (zero.config_file, read once:
    ResolvedRun.deepspeed_user) overrides them, except where it says "auto" (the HF
    convention), which takes ours. ``limits``: the ``zero_optimization`` sizes of
    ``memory_limits`` (known once the model is built)."""
    zero, optim = settings.zero, settings.optim
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum_steps,
        "gradient_clipping": optim.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": zero.stage, **(limits or {})},
        "bf16": {"enabled": settings.precision.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if zero.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if zero.offload_params:
        ours["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if zero.hpz_partition_size > 1:
        ours["zero_optimization"]["zero_hpz_partition_size"] = zero.hpz_partition_size
    return merge_deepspeed(ours, dict(settings.deepspeed_user))


def memory_limits(stage: int, layer_numel: int, trainable_numel: int) -> dict[str, int]:
    """The ZeRO sizes a memory-budgeted adapter trainer sets instead of DeepSpeed's
    defaults, which are tuned for full fine-tuning speed (docs/measurements.md, "ZeRO's
    buffers"):

    - ``reduce_bucket_size`` (and stages 1/2 ``allgather_bucket_size``): DeepSpeed
      allocates gradient buckets of 5e8 elements (stage 3 one per gradient dtype at engine
      start; stages 1/2 one, or two with overlap_comm, every backward): 1 GiB in bf16, 2 in
      fp32, per rank, for gradients that are only the adapters' (megabytes). Capped at the
      trainable element count, so a bucket still holds every gradient at once.
    - stage 3: ``stage3_max_reuse_distance`` and ``stage3_max_live_parameters`` default to
      1e9 parameters: a gathered parameter is kept while it is reused within 1e9
      parameters, so a model under 1e9 parameters stays whole on every rank from forward
      to backward, and a larger one keeps up to 1e9 gathered parameters (2 GiB in bf16) on
      top of its shard; ``stage3_prefetch_bucket_size`` (5e7) gathers ahead by that much.
      Set to one decoder layer (prefetch, reuse: the recomputation and the backward of a
      checkpointed layer share its gathered weights) and two layers live (the one running
      and the one prefetched): FSDP2's behaviour, one layer gathered and the next
      prefetched.

    ``layer_numel``: elements of the largest decoder layer (as stored: int8 / packed 4-bit
    elements for a quantised base)."""
    bucket = zero_bucket_numel(trainable_numel)
    out = {"reduce_bucket_size": bucket}
    if stage == 3:
        out.update(
            stage3_prefetch_bucket_size=layer_numel,
            stage3_max_live_parameters=2 * layer_numel,
            stage3_max_reuse_distance=layer_numel,
        )
    else:
        out["allgather_bucket_size"] = bucket
    return out


def largest_layer_numel(model: nn.Module) -> int:
    """Elements of the largest decoder layer (a ZeRO-3 partitioned parameter counts whole)."""
    return max(sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) for layer in decoder_layers(model))
