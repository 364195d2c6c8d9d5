"""Build the backend a ``BackendSpec`` names. FSDP2 and ZeRO are imported only when chosen
(DeepSpeed is an optional dependency)."""

from __future__ import annotations

from wlora_dist.distributed.base import Backend, WeightsSource
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.settings import BackendSettings
from wlora_dist.errors import UserError


def make_backend(settings: BackendSettings, env: DistEnv, weights: WeightsSource | None = None) -> Backend:
    """The backend ``settings.spec`` names; every backend takes the same inputs."""
    problem = settings.spec.world_problem(env.world_size)
    if problem:
        raise UserError(problem)
    if settings.spec.kind == "replicated":
        from wlora_dist.distributed.replicated import ReplicatedBackend

        return ReplicatedBackend(settings, env, weights)
    if settings.spec.kind == "fsdp2":
        from wlora_dist.distributed.fsdp2 import FSDP2Backend

        return FSDP2Backend(settings, env, weights)
    from wlora_dist.distributed.zero import ZeROBackend

    return ZeROBackend(settings, env, weights)
