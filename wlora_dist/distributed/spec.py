"""What backend a run uses, typed and resolved in one place.

``BackendSpec`` is the backend's identity: its kind, the ZeRO stage and whether it offloads
to CPU memory. ``resolve_backend`` is the only function that turns the run config (with
the launcher's choices already applied, see launchers.py) into one; the trainer builds its
backend from it, the memory planner plans it, ``wlora-dist plan --config`` shows it and the
logs and checkpoints name it. So the plan always describes the run that will happen.

Pure: no torch.distributed, no DeepSpeed import (a user's DeepSpeed JSON is read as JSON).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wlora_dist.config import ConfigError, DistributedConfig, RunConfig
from wlora_dist.errors import UserError

BackendKind = Literal["replicated", "fsdp2", "zero"]
KINDS: tuple[BackendKind, ...] = ("replicated", "fsdp2", "zero")


@dataclass(frozen=True)
class BackendSpec:
    kind: BackendKind = "fsdp2"
    zero_stage: int = 0  # 1, 2 or 3 for kind "zero"; 0 otherwise
    offload: bool = False  # FSDP2 cpu_offload / ZeRO offload_optimizer (+ offload_param)
    shard_size: int = 0  # FSDP2: ranks per shard group (HSDP); 0: the whole world
    hpz_size: int = 0  # ZeRO-3: ranks of hpZ's secondary partition (0: off)
    sequence_parallel: int = 1  # ranks sharing each sequence (Ulysses); the data are split over world / N

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backend kind {self.kind!r}: one of {KINDS}")
        if (self.kind == "zero") != (self.zero_stage in (1, 2, 3)):
            raise ValueError(f"backend {self.kind!r} with zero_stage {self.zero_stage}: stages 1-3 are for zero only")
        if self.shard_size and self.kind != "fsdp2":
            raise ValueError(f"shard_size {self.shard_size} with backend {self.kind!r}: HSDP is FSDP2's")
        if self.hpz_size and self.zero_stage != 3:
            raise ValueError(f"hpz_size {self.hpz_size} with backend {self.name!r}: hpZ is ZeRO-3's")

    def base_fraction(self, world: int) -> float:
        """Of the frozen base, what one rank holds between steps: its shard (1 / ranks in a
        shard group), plus hpZ's secondary partition (1 / hpz_size) under ZeRO-3 hpZ."""
        held = 1 / self.mesh_shape(world)[1]
        if self.hpz_size > 1:
            held += 1 / min(self.hpz_size, world)  # DeepSpeed caps the group at the world
        return held

    def mesh_shape(self, world: int) -> tuple[int, int]:
        """(replicas, ranks per shard group) on ``world`` ranks: (1, world) where the base is
        sharded over every rank, (world, 1) where it is not sharded at all, (world / N, N)
        under HSDP."""
        if not self.shards_base:
            return world, 1
        shard = self.shard_size if self.kind == "fsdp2" and 0 < self.shard_size < world else world
        return world // shard, shard

    def world_problem(self, world: int) -> str | None:
        """Why this backend cannot run on ``world`` ranks (None: it can)."""
        if world % self.sequence_parallel:
            return (
                f"distributed.sequence_parallel: {self.sequence_parallel} does not divide the {world} ranks of this "
                f"job; use a divisor of {world}"
            )
        if self.shard_size and world % self.shard_size:
            return (
                f"distributed.fsdp.shard_size: {self.shard_size} does not divide the {world} ranks of this job; "
                f"use a divisor of {world} (the GPUs per node, typically) or 0 to shard over every rank"
            )
        if self.hpz_size > 1 and world % min(self.hpz_size, world):
            return (
                f"distributed.zero.hpz_partition_size (DeepSpeed's zero_hpz_partition_size): {self.hpz_size} does "
                f"not divide the {world} ranks of this job; use a divisor of {world} (the GPUs per node, typically)"
            )
        return None

    @property
    def name(self) -> str:
        """replicated, fsdp2, zero1, zero2 or zero3: what logs and checkpoints say."""
        return f"zero{self.zero_stage}" if self.kind == "zero" else self.kind

    @property
    def shards_base(self) -> bool:
        """Whether each rank holds only its shard of the frozen base."""
        return self.kind == "fsdp2" or self.zero_stage == 3

    @property
    def casts_adapters_per_use(self) -> bool:
        """Under bf16 autocast the adapters stay fp32 and autocast copies each to bf16 where
        it is used (replicated); FSDP2's and DeepSpeed's mixed precision hold bf16 copies."""
        return self.kind == "replicated"

    def trainable_bytes(self, numel: int, world: int, compute_bytes: int) -> tuple[float, float, float]:
        """This backend's byte model for ``numel`` trainable elements on one of ``world``
        ranks: (parameters with any fp32 masters, gradients, optimizer state). The planner
        asks this instead of knowing the backends."""
        ws = self.mesh_shape(world)[1] if self.kind == "fsdp2" else world
        if self.kind == "fsdp2":
            params, grads, optim = 4 * numel / ws, 4 * numel / ws, 8 * numel / ws
        elif self.kind == "zero":
            # DeepSpeed: compute-dtype params (partitioned at stage 3) + an fp32 master partition.
            params = compute_bytes * numel / (ws if self.zero_stage == 3 else 1) + 4 * numel / ws
            grads = compute_bytes * numel / (ws if self.zero_stage >= 2 else 1)
            optim = 8 * numel / ws
        else:
            params, grads, optim = 4 * numel, 4 * numel, 8 * numel
        if self.offload:
            optim = 0
            if self.kind == "zero":
                params -= 4 * numel / ws  # the fp32 master partition lives with the optimizer on CPU
        return params, grads, optim

    def grad_bucket_bytes(self, trainable_numel: int, compute_bytes: int) -> int:
        """DeepSpeed's gradient reduction bucket on a rank: stage 3 allocates one at engine
        start in the gradients' dtype, stages 1/2 one at each backward (fp32 at stage 1,
        where it stages the fp32 accumulation; the gradients' dtype at stage 2). Sized
        ``zero_bucket_numel`` by wlora_dist, where DeepSpeed's 5e8 alone would be 1 GiB in
        bf16. None under the other backends."""
        if self.kind != "zero":
            return 0
        return zero_bucket_numel(trainable_numel) * (4 if self.zero_stage == 1 else compute_bytes)

    def describe(self, world: int | None = None) -> str:
        words = f"zero stage {self.zero_stage}" if self.kind == "zero" else self.kind
        if self.kind == "fsdp2" and self.shard_size:
            if world:
                replicas, shard = self.mesh_shape(world)
                words += f" HSDP ({replicas} x {shard}: replicas x shard group)"
            else:
                words += f" HSDP (shard groups of {self.shard_size})"
        if self.hpz_size > 1:
            words += f" hpZ (secondary partitions over {self.hpz_size} ranks)"
        if self.sequence_parallel > 1:
            words += f" + sequence parallel {self.sequence_parallel}"
        return words + (" + CPU offload" if self.offload else "")

    def data_ranks(self, world: int) -> int:
        """Ranks that read different rows: the world, over the ranks sharing each sequence."""
        return world // self.sequence_parallel

    @classmethod
    def parse(cls, name: str, offload: bool = False) -> BackendSpec:
        """From a name as ``name`` gives it (zero alone means stage 3)."""
        if name.startswith("zero"):
            return cls("zero", int(name[4:] or 3), offload)
        return cls(name, 0, offload)  # type: ignore[arg-type]


# DeepSpeed's default bucket (elements) for gradient reduction and (stages 1/2) the
# all-gather of updated parameters; wlora_dist caps it (distributed/zero_config.py, memory_limits).
DEEPSPEED_BUCKET = 500_000_000


def zero_bucket_numel(trainable_numel: int) -> int:
    """The elements of ZeRO's gradient buckets wlora_dist sets: every trainable gradient at
    once, never more than DeepSpeed's default; even (stage 1/2 alignment)."""
    return max(2, min(DEEPSPEED_BUCKET, trainable_numel + trainable_numel % 2))


def resolve_backend(cfg: DistributedConfig, user: dict[str, Any] | None = None) -> BackendSpec:
    """The backend a run with ``cfg`` uses. ``auto`` is replicated unless a launcher chose
    otherwise (its choice is in ``cfg`` already); ZeRO's stage and offload are those of
    the merged DeepSpeed config (a user JSON may set them; ``user``: that JSON, already
    read, as ResolvedRun holds it; None reads zero.config_file)."""
    sp = cfg.sequence_parallel
    if cfg.backend in ("auto", "replicated"):
        return BackendSpec("replicated", sequence_parallel=sp)
    if cfg.backend == "fsdp2":
        return BackendSpec("fsdp2", 0, cfg.fsdp.cpu_offload, cfg.fsdp.shard_size, sequence_parallel=sp)
    zero = deepspeed_zero_section(cfg, user)
    offload = any(_offloaded(zero.get(key)) for key in ("offload_optimizer", "offload_param"))
    stage, hpz = int(zero["stage"]), int(zero.get("zero_hpz_partition_size") or 1)
    return BackendSpec("zero", stage, offload, hpz_size=hpz if hpz > 1 and stage == 3 else 0, sequence_parallel=sp)


def _offloaded(section: Any) -> bool:
    return isinstance(section, dict) and str(section.get("device", "none")).lower() not in ("none", "")


def deepspeed_zero_section(cfg: DistributedConfig, user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``zero_optimization`` section of the DeepSpeed config the run uses."""
    z = cfg.zero
    ours: dict[str, Any] = {"stage": z.stage}
    if z.offload_optimizer:
        ours["offload_optimizer"] = {"device": "cpu"}
    if z.offload_params:
        ours["offload_param"] = {"device": "cpu"}
    if z.hpz_partition_size > 1:
        ours["zero_hpz_partition_size"] = z.hpz_partition_size
    if user is None:
        user = read_user_deepspeed_json(z.config_file)
    return merge_deepspeed(ours, user.get("zero_optimization") or {})


def read_user_deepspeed_json(path: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON (distributed.zero.config_file), or {} when none is set."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise UserError(f"distributed.zero.config_file={path!r}: no such file")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"distributed.zero.config_file={path!r}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"distributed.zero.config_file={path!r}: expected a JSON object")
    return data


def merge_deepspeed(ours: dict, user: dict) -> dict:
    """``user`` over ``ours``, except where the user says "auto" (the HF convention)."""
    out = copy.deepcopy(ours)
    for key, value in user.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_deepspeed(out[key], value)
        else:
            out[key] = value
    return out


def check_backend_supports(cfg: RunConfig, spec: BackendSpec) -> None:
    """Settings one backend cannot honour, refused before anything is built."""
    if spec.kind == "zero" and cfg.optim.loraplus_lr_ratio != 1.0:
        raise ConfigError(
            [
                f"optim.loraplus_lr_ratio: {cfg.optim.loraplus_lr_ratio:g} (LoRA+) needs its own parameter group for "
                "the B matrices, and DeepSpeed ZeRO's engine builds the groups itself; use distributed.backend: fsdp2 "
                "(or replicated), or set optim.loraplus_lr_ratio: 1"
            ],
            "optim",
        )
    if spec.kind == "zero" and cfg.selection.clip_gates:
        raise ConfigError(
            [
                "selection.clip_gates: DeepSpeed ZeRO clips inside its engine, over its own parameters only, so the "
                "gates cannot be clipped with the adapters; set selection.clip_gates: false (selection.preset: authors "
                "turns it on) or use distributed.backend fsdp2 / replicated"
            ],
            "selection",
        )


def check_heads(heads: int, kv_heads: int, n: int) -> str | None:
    """Why ``n`` ranks cannot share the attention of a model with ``heads`` query and
    ``kv_heads`` key/value heads (None: they can)."""
    if heads % n:
        return f"{heads} attention heads cannot be split over {n} ranks; use a divisor of {heads}"
    if kv_heads % n and n % kv_heads:
        return (
            f"{kv_heads} key/value heads cannot be split over {n} ranks, nor copied to them evenly; use a "
            f"divisor or a multiple of {kv_heads}"
        )
    return None
