"""distributed.*: the backend (replicated, FSDP2, DeepSpeed ZeRO) and its settings."""

from __future__ import annotations

from typing import Annotated, Literal

from wlora_dist.config.fields import Float, Section, at_least, check, field


class FSDPConfig(Section):
    reshard_after_forward: bool = field(
        True, "Free gathered parameters after forward (less memory, one more all-gather)."
    )
    cpu_offload: bool = field(False, "Keep sharded parameters, gradients and optimizer state in CPU memory.")
    mixed_precision: Literal["bf16", "no"] = field(
        "bf16",
        "When the run computes in bf16 (train.mixed_precision auto / bf16 on a GPU): bf16 compute copies of the "
        "parameters with fp32 gradient reduction, or fp32 copies under bf16 autocast (no).",
    )
    shard_size: Annotated[int, check(lambda v: v >= 0, "must be >= 0")] = field(
        0,
        "Ranks that share one copy of the frozen base. 0: every rank of the job (FSDP). N: hybrid sharding "
        "(HSDP): the base sharded within groups of N ranks and replicated across the groups, so each step's "
        "all-gathers stay inside a group; set it to the GPUs per node. The world size must be a multiple of N.",
    )


class ZeROConfig(Section):
    stage: Annotated[int, check(lambda v: v in (1, 2, 3), "must be 1, 2 or 3")] = field(
        2, "ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters, base included)."
    )
    offload_optimizer: bool = field(False, "Keep optimizer state in CPU memory.")
    offload_params: bool = field(False, "Keep parameters in CPU memory (stage 3).")
    config_file: str = field("", "Your own DeepSpeed JSON; its values win over ours except where they are 'auto'.")
    hpz_partition_size: Annotated[int, check(lambda v: v >= 1, "must be >= 1")] = field(
        1,
        "Stage 3 only, ZeRO++'s hierarchical partitioning (hpZ): each rank also keeps a second partition of "
        "the base over groups of this many ranks (the GPUs per node), so backward's all-gathers stay in the "
        "node; costs base / N more bytes per rank. 1: off. DeepSpeed's zero_hpz_partition_size.",
    )

    def problems(self) -> list[str]:
        out = []
        if self.offload_params and self.stage != 3:
            out.append("distributed.zero.offload_params: needs distributed.zero.stage=3")
        if self.hpz_partition_size > 1 and self.stage != 3:
            out.append(
                f"distributed.zero.hpz_partition_size: {self.hpz_partition_size} partitions the parameters a "
                "second time, which needs distributed.zero.stage=3; set it to 1 or the stage to 3"
            )
        return out


class DistributedConfig(Section):
    backend: Literal["auto", "replicated", "fsdp2", "zero"] = field(
        "auto",
        "auto: what `accelerate launch --config_file` chose (FSDP -> fsdp2, DEEPSPEED -> zero), else replicated; "
        "replicated: every rank holds the model, adapter grads all-reduced; fsdp2: torch FSDP2 shards "
        "base and adapters; zero: DeepSpeed ZeRO (distributed.zero.stage).",
    )
    fsdp: FSDPConfig = field(FSDPConfig, "torch FSDP2 (distributed.backend fsdp2).")
    zero: ZeROConfig = field(ZeROConfig, "DeepSpeed ZeRO (distributed.backend zero).")
    sequence_parallel: Annotated[int, at_least(1)] = field(
        1,
        "N > 1: N ranks share each sequence (Ulysses): each runs the model on 1/N of the tokens, and "
        "attention gathers the whole sequence for 1/N of the heads; the data are split over world / N "
        "groups. For long sequences, where activations decide what fits. N divides the world size and the "
        "attention heads (and divides or is a multiple of the key/value heads). Packed rows get a dense "
        "sequence x sequence mask: keep data.packing off at long sequences.",
    )
    timeout_minutes: Annotated[Float, check(lambda v: v > 0, "must be > 0")] = field(
        30.0, "Collective timeout: a dead rank fails the others after this long."
    )
