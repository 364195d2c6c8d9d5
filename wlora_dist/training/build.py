"""The steps that set a run up, each returning what it builds (the way torchtune's recipes
do): this rank's data (and the run sized from it), then the model with its adapters and
gates, wrapped by the backend, and the selector over them. The trainer calls them in order
and keeps what they return."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from wlora_dist.config import RunConfig
from wlora_dist.data import pipeline as data_mod
from wlora_dist.distributed.base import Backend
from wlora_dist.distributed.env import REPLICA_SYNC, DistEnv, sequence_group
from wlora_dist.distributed.sequence_parallel import use_sequence_parallel
from wlora_dist.method.init import derive_seed
from wlora_dist.method.selector import Selector
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.blocks import compile_decoder_layers
from wlora_dist.model.loading import load_tokenizer
from wlora_dist.resolved import ResolvedRun
from wlora_dist.training.inputs import StepInputs
from wlora_dist.training.preflight import check_adapters


@dataclass
class RunData:
    """This rank's loaders and the epoch they make."""

    train: DataLoader
    eval: DataLoader | None
    steps_per_epoch: int  # optimizer steps in one pass over data.train


def build_data(run: ResolvedRun, env: DistEnv) -> tuple[ResolvedRun, RunData]:
    """This rank's loaders (collective: the data are tokenised once), and the run sized
    from them (train.epochs / selection.steps_fraction / optim.warmup_ratio -> step counts)."""
    cfg = run.cfg
    train, eval_loader = data_mod.build_loaders(
        cfg.data,
        cfg.train.micro_batch_size,
        cfg.train.seed,
        load_tokenizer(cfg.model),
        env.global_rank,
        env.world_size,
        run.paths.data_cache,
        cfg.distributed.sequence_parallel,
    )
    steps_per_epoch = len(train) // cfg.train.grad_accum_steps
    return (run if run.sized else run.sized_by(steps_per_epoch)), RunData(train, eval_loader, steps_per_epoch)


def prepare_base(base: nn.Module, cfg: RunConfig) -> None:
    """The base as training needs it: no KV cache (packed rows depend on it: transformers
    reads restarting position ids as row boundaries only when there is no cache), and the
    tiled loss where train.loss_shards asks for it."""
    base.config.use_cache = False
    if cfg.train.loss_shards:
        from wlora_dist.model.loss import tiled_causal_lm_loss

        base.loss_function = tiled_causal_lm_loss(cfg.train.loss_shards)


def step_inputs(cfg: RunConfig, env: DistEnv) -> tuple[StepInputs, dist.ProcessGroup | None]:
    """How this rank turns micro-batches into model inputs, and its sequence-parallel group
    (collective where distributed.sequence_parallel > 1: every rank makes every group)."""
    n = cfg.distributed.sequence_parallel
    return StepInputs(env.device, n, env.global_rank % n), sequence_group(n)


def build_model(
    base: nn.Module,
    cfg: RunConfig,
    env: DistEnv,
    backend: Backend,
    on_attached: Callable[[WeightLoRA], None],
    sequence_group: dist.ProcessGroup | None = None,
) -> tuple[WeightLoRA, Selector]:
    """Adapters and gates on ``base`` (checked against the settings), wrapped by the
    backend (which makes the optimizer), compiled where asked; the selector over them.
    ``on_attached``: the callbacks' look at the adapters before the backend wraps them;
    ``sequence_group``: the ranks sharing each sequence (attention through Ulysses)."""
    prepare_base(base, cfg)
    if sequence_group is not None:
        use_sequence_parallel(base, sequence_group)
    wl = WeightLoRA.attach(base, cfg.adapter)
    if not any(p.is_meta for p in wl.trainable_parameters()):
        wl.init_adapters(cfg.train.seed)  # models on meta get the same values as they are filled
    check_adapters(wl, cfg)
    on_attached(wl)
    backend.prepare(wl)
    if cfg.train.compile:
        compile_decoder_layers(wl.base_model)
    wl.gates.data = wl.gates.data.to(env.device)
    selector = Selector(wl, cfg.selection, cfg.train.seed, REPLICA_SYNC)
    torch.manual_seed(derive_seed(cfg.train.seed, rank=env.global_rank))  # dropout differs per rank, as in DDP
    return wl, selector
