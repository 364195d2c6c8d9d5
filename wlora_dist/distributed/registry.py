"""Build the backend a ``BackendSpec`` names. FSDP2 and ZeRO are imported only when chosen
(DeepSpeed is an optional dependency)."""

from __future__ import annotations

from wlora_dist.config import RunConfig
from wlora_dist.distributed.base import Backend, WeightsSource
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.spec import BackendSpec


def make_backend(spec: BackendSpec, cfg: RunConfig, env: DistEnv, weights: WeightsSource | None = None) -> Backend:
    if spec.kind == "replicated":
        from wlora_dist.distributed.replicated import ReplicatedBackend

        return ReplicatedBackend(spec, env, cfg.optim, cfg.train.seed, weights)
    if spec.kind == "fsdp2":
        from wlora_dist.distributed.fsdp2 import FSDP2Backend

        return FSDP2Backend(spec, env, cfg, weights)
    from wlora_dist.distributed.zero import ZeROBackend

    return ZeROBackend(spec, env, cfg, weights)
