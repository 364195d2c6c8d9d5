"""Build the backend a ``BackendSpec`` names. FSDP2 and ZeRO are imported only when chosen
(DeepSpeed is an optional dependency)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wlora_dist.distributed.base import Backend, WeightsSource
from wlora_dist.distributed.env import DistEnv
from wlora_dist.errors import UserError

if TYPE_CHECKING:  # annotations only: the resolved run lives above this layer (docs/architecture.md)
    from wlora_dist.resolved import ResolvedRun


def make_backend(run: ResolvedRun, env: DistEnv, weights: WeightsSource | None = None) -> Backend:
    """The backend ``run.spec`` names; every backend takes the same inputs."""
    problem = run.spec.world_problem(env.world_size)
    if problem:
        raise UserError(problem)
    if run.spec.kind == "replicated":
        from wlora_dist.distributed.replicated import ReplicatedBackend

        return ReplicatedBackend(run, env, weights)
    if run.spec.kind == "fsdp2":
        from wlora_dist.distributed.fsdp2 import FSDP2Backend

        return FSDP2Backend(run, env, weights)
    from wlora_dist.distributed.zero import ZeROBackend

    return ZeROBackend(run, env, weights)
