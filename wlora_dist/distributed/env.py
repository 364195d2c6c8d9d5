"""Process-group plumbing and the few collectives the trainer needs.

All torch.distributed calls of the project live here (and in backends.py). Launchers
(torchrun, accelerate launch, the deepspeed launcher, srun) all export RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we init the group ourselves, gloo
on CPU and nccl on GPU, so the same code path runs in CPU tests and on a cluster.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    global_rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group the launcher set up (or run alone when none did)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    global_rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if dist.is_initialized():
        world_size, global_rank = dist.get_world_size(), dist.get_rank()
    # accelerate's trackers and logging read its shared state; it finds our group and
    # leaves it as it is (under an accelerate DeepSpeed config it also starts DeepSpeed's
    # comm layer, which prints a build line per rank).
    from accelerate import PartialState

    from wlora_dist.noise import drop_printed

    with drop_printed("deepspeed_shm_comm_op built successfully"):
        PartialState()
    return DistEnv(global_rank, local_rank, world_size, device)


def shutdown() -> None:
    """Leave the group together: a rank tearing gloo down while another still talks to it
    can abort the process at exit."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``tensor`` over all ranks (no-op alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


class RankMismatchError(RuntimeError):
    """Replicated state (the gates) differs between ranks: a bug, never to be trained on."""


def assert_same_on_all_ranks(tensor: torch.Tensor, what: str) -> None:
    """Bitwise check that every rank holds the same ``tensor`` (all-gather; n is small)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    local = tensor.detach().contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    # Compare raw bytes: bitwise, and NaN == NaN where both ranks hold the same NaN.
    ref = gathered[0].reshape(-1).view(torch.uint8)
    bad = [r for r, t in enumerate(gathered) if not torch.equal(t.reshape(-1).view(torch.uint8), ref)]
    if bad:
        raise RankMismatchError(f"{what} differs on ranks {bad} from rank 0: replicated state diverged")


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _ReplicaSync:
    """The collectives of the replicated gate vector (method.selector.ReplicaSync)."""

    @staticmethod
    def mean_(tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean_(tensor)

    @staticmethod
    def check_same(tensor: torch.Tensor, what: str) -> None:
        assert_same_on_all_ranks(tensor, what)


REPLICA_SYNC = _ReplicaSync()


def exit_now(*keep_alive: object) -> None:
    """Leave a finished worker process without the interpreter's teardown (its results
    written, its process group left; ``keep_alive``: what must not be torn down before, such
    as trainers whose DeepSpeed engines hold gloo work handles): a rank's teardown of C++ threads (gloo, DeepSpeed)
    has nothing to add, and once in a while on a loaded machine it aborted a finished run
    ('terminate called without an active exception', exit -6)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def sequence_group(n: int) -> dist.ProcessGroup | None:
    """This rank's group of ``n`` consecutive ranks sharing each sequence (on one node when
    n divides the GPUs per node); None when n is 1. Collective: every rank makes every
    group, as torch.distributed asks."""
    if n == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, n):
        group = dist.new_group(list(range(start, start + n)))
        if start <= rank < start + n:
            mine = group
    return mine
