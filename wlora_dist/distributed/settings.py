"""What a backend reads of a run, built once: ``BackendSettings`` holds the few settings a
backend uses (its spec, the optimizer, the seed, the FSDP2 / ZeRO sections, the batch
sizes DeepSpeed's config names, the user's DeepSpeed JSON) and the run's ``Precision``,
decided here and nowhere else. Backends never see the whole run (a higher layer).

Pure: config sections and the spec, no torch.distributed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from wlora_dist.config import ConfigError, FSDPConfig, OptimConfig, RunConfig, ZeROConfig
from wlora_dist.distributed.spec import BackendSpec


@dataclass(frozen=True)
class Precision:
    """How a run computes, decided once (``precision_of``): in bf16 on a GPU when
    train.mixed_precision is auto or bf16 (bf16 autocast around each forward, FSDP2's bf16
    compute copies where distributed.fsdp.mixed_precision allows them, DeepSpeed's bf16
    flag, the planner's compute bytes); otherwise in the base's dtype."""

    bf16: bool = False


def precision_of(cfg: RunConfig, on_gpu: bool) -> Precision:
    return Precision(bf16=on_gpu and cfg.train.mixed_precision in ("auto", "bf16"))


def machine_problems(cfg: RunConfig, spec: BackendSpec, on_gpu: bool) -> list[str]:
    """Settings this machine cannot run (known once the device is: in every process, as the
    backend is made; ``BackendSpec.world_problem`` checks the number of ranks)."""
    p = []
    if spec.kind == "fsdp2" and cfg.distributed.fsdp.cpu_offload and not on_gpu:
        p.append(
            "distributed.fsdp.cpu_offload: true needs a GPU (it moves shards between GPU and CPU memory); "
            "without one everything already lives in CPU memory: set it to false"
        )
    if cfg.memory.replan_at_prune and not cfg.memory.budget_gib and not on_gpu:
        p.append("memory.replan_at_prune: true needs memory.budget_gib on a machine without a GPU (GiB per rank)")
    return p


@dataclass(frozen=True)
class BackendSettings:
    spec: BackendSpec
    precision: Precision
    optim: OptimConfig
    seed: int  # train.seed: the deterministic adapter init of models built on meta
    fsdp: FSDPConfig
    zero: ZeROConfig
    micro_batch_size: int  # train.micro_batch_size (DeepSpeed's config names it)
    grad_accum_steps: int  # train.grad_accum_steps (likewise)
    deepspeed_user: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(
        cls, cfg: RunConfig, spec: BackendSpec, device_type: str, deepspeed_user: Mapping[str, Any] | None = None
    ) -> BackendSettings:
        """The settings of ``cfg`` a backend reads, on a machine whose device is
        ``device_type``; refuses settings this machine cannot run."""
        on_gpu = device_type == "cuda"
        problems = machine_problems(cfg, spec, on_gpu)
        if problems:
            raise ConfigError(problems, "this machine")
        return cls(
            spec=spec,
            precision=precision_of(cfg, on_gpu),
            optim=cfg.optim,
            seed=cfg.train.seed,
            fsdp=cfg.distributed.fsdp,
            zero=cfg.distributed.zero,
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps,
            deepspeed_user=MappingProxyType(dict(deepspeed_user or {})),
        )

    @property
    def fsdp_bf16_params(self) -> bool:
        """FSDP2's MixedPrecisionPolicy: bf16 compute copies, fp32 gradient reduction."""
        return self.precision.bf16 and self.fsdp.mixed_precision == "bf16"
