"""Backends: how the model is wrapped, how adapter gradients are reduced, and who owns the
optimizer. The trainer talks to this one interface only; FSDP2 and DeepSpeed ZeRO
implement it next to ``ReplicatedBackend``.

The gate vector is never the backend's business: it lives outside the model and the
trainer all-reduces its gradient itself (see weight_lora.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import ModelConfig, OptimConfig, RunConfig
from .distributed import DistEnv, all_reduce_mean_, broadcast_
from .modeling import load_base_model
from .sharded_loading import CheckpointReader, LoadStats, build_on_meta, is_on_meta, local_rows, materialize_sharded
from .weight_lora import WeightLoRA


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Backend(ABC):
    name: str

    def __init__(self, env: DistEnv, optim_cfg: OptimConfig, seed: int) -> None:
        self.env = env
        self.optim_cfg = optim_cfg
        self.seed = seed  # of the deterministic adapter init of models built on meta
        self.optimizer: torch.optim.Optimizer | None = None
        self._module: nn.Module | None = None
        self.model_path = ""
        self.load_stats: LoadStats | None = None
        # Where a model built on meta gets its base weights: None = the checkpoint at
        # model.path; benchmarks set a reader of random weights (harness.RandomWeights).
        self.weights_reader: Callable[[nn.Module], CheckpointReader] | None = None

    @property
    def module(self) -> nn.Module:
        """What to call for forward; ask every time: ZeRO swaps its engine at the prune event."""
        assert self._module is not None, "call prepare() first"
        return self._module

    def load_base(self, cfg: ModelConfig) -> PreTrainedModel:
        """The frozen base model; sharded backends override this to never hold it whole.
        An 8-bit base is built on meta and filled tensor by tensor in prepare(), its weights
        quantised as they are read: never a whole float copy of the model."""
        self.model_path = cfg.path
        if cfg.quantization == "int8":
            return build_on_meta(cfg, self.env.device)
        return load_base_model(cfg, self.env.device)

    def _materialize_if_meta(self, wl: WeightLoRA) -> None:
        """Fill a model built on meta (all of it on this rank): base from the checkpoint,
        adapters with their deterministic init."""
        if is_on_meta(wl.peft_model):
            self.load_stats = materialize_sharded(wl, self.model_path, self.env.device, self.seed, self._reader(wl))

    def _reader(self, wl: WeightLoRA) -> CheckpointReader | None:
        return self.weights_reader(wl.base_model) if self.weights_reader is not None else None

    @abstractmethod
    def prepare(self, wl: WeightLoRA) -> nn.Module:
        """Place / wrap / shard ``wl.peft_model``; return the module to call for forward."""

    @abstractmethod
    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Make every rank's .grad the mean over the data-parallel group."""

    @abstractmethod
    def rebuild_after_prune(self, kept: list[nn.Parameter], keep_state: bool) -> None:
        """Drop everything the backend holds of removed adapters; optimizer over ``kept``."""

    def adapters_replaced(self, wl: WeightLoRA, sites: list) -> None:
        """Adapters of ``sites`` got new modules (WeightLoRA+ rank doubling): wrap / shard
        them as prepare() did; rebuild_after_prune follows. Nothing to do when replicated."""
        return None

    def build_optimizer(self, params: list[nn.Parameter]) -> None:
        c = self.optim_cfg
        self.optimizer = torch.optim.AdamW(
            params, lr=c.lr, betas=(c.betas[0], c.betas[1]), eps=c.eps, weight_decay=c.weight_decay
        )

    def _rebuild_optimizer(self, kept: list[nn.Parameter], keep_state: bool) -> None:
        """A new AdamW over ``kept`` at the current LR; Adam state carried over if asked."""
        old = self.optimizer
        assert old is not None
        lr = old.param_groups[0]["lr"]
        self.build_optimizer(kept)
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if keep_state:
            for p in kept:
                if p in old.state:
                    self.optimizer.state[p] = old.state[p]
        old.state.clear()
        old.param_groups.clear()

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        """Backward of one micro-step (``loss`` already divided by the accumulation steps)."""
        loss.backward()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # DTensor grads (FSDP2): the norm is all-reduced
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def step(self, params: list[nn.Parameter], lr: float, max_grad_norm: float) -> float:
        """Clip, then one optimizer step at ``lr``; returns the gradient norm before clipping."""
        assert self.optimizer is not None
        norm = self.clip_grad_norm(params, max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return norm

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint_tensors(self, named: dict[str, nn.Parameter], for_load: bool) -> dict[str, torch.Tensor]:
        """The adapters and their AdamW state as checkpoint tensors, keyed by adapter name:
        here the live tensors themselves (DTensor shards under FSDP2), so a checkpoint
        load fills them in place. AdamW state not created yet (before the first step after
        a rebuild) is created now as zeros, which AdamW treats exactly as a fresh state."""
        assert self.optimizer is not None
        out: dict[str, torch.Tensor] = {}
        for name, p in named.items():
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)  # AdamW's own format
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out[f"adapter.{name}"] = p.detach()
            out[f"optim.{name}.exp_avg"] = state["exp_avg"]
            out[f"optim.{name}.exp_avg_sq"] = state["exp_avg_sq"]
            out[f"optim.{name}.step"] = state["step"].view(1)
        return out

    def load_checkpoint_tensors(self, named: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
        """After a checkpoint load filled ``tensors`` (from ``checkpoint_tensors(for_load=True)``);
        nothing to do here, where they were the live tensors."""
        return None

    @torch.no_grad()
    def assign_full(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Write the full ``value`` into ``param``: all of it, or this rank's rows of a
        dim-0-sharded DTensor (FSDP2)."""
        local, start = local_rows(param)
        local.copy_(value[start : start + local.shape[0]])

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full (unsharded) copies of ``tensors``; a collective where they are sharded."""
        return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]

    def zero_grad(self) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)

    def memory_report(self, params: list[nn.Parameter]) -> dict[str, int]:
        """This rank's bytes of trainable parameters, gradients and optimizer state."""
        state = []
        if self.optimizer is not None:
            for s in self.optimizer.state.values():
                state += [v for v in s.values() if isinstance(v, torch.Tensor)]
        return {
            "trainable_param_bytes": tensor_bytes([_local(p) for p in params]),
            "grad_bytes": tensor_bytes([_local(p.grad) for p in params if p.grad is not None]),
            "optimizer_state_bytes": tensor_bytes([_local(t) for t in state]),
        }


def base_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """This rank's bytes of the frozen base between steps, per dtype: its shard (FSDP2
    DTensor / ZeRO-3 partition) plus any full copy it keeps."""
    out: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            continue
        held = [_local(p)]
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, plus .data if not released
            held = [p.ds_tensor, p.data]
        key = str(held[0].dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + tensor_bytes(held)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded DTensor) tensor held by this rank."""
    return t.to_local() if hasattr(t, "to_local") else t


class ReplicatedBackend(Backend):
    """Every rank holds the whole model; adapter gradients are averaged by one all-reduce.

    Written by hand rather than with torch DDP: DDP's reducer keeps references to every
    parameter it was built over, so after the prune event it would have to be torn down and
    rebuilt to free the removed adapters; one flat all-reduce is all we need here.
    """

    name = "replicated"

    def prepare(self, wl: WeightLoRA) -> nn.Module:
        self._materialize_if_meta(wl)
        wl.peft_model.to(self.env.device)
        self._module = wl.peft_model
        # Same seed on every rank gives the same init; the broadcast makes it a guarantee.
        with torch.no_grad():
            for p in wl.trainable_parameters():
                broadcast_(p.data, src=0)
        return wl.peft_model

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        if not self.env.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_mean_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def rebuild_after_prune(self, kept: list[nn.Parameter], keep_state: bool) -> None:
        self._rebuild_optimizer(kept, keep_state)


def make_backend(cfg: RunConfig, env: DistEnv) -> Backend:
    """The configured backend. FSDP2 and ZeRO are imported only when chosen."""
    name = cfg.distributed.backend
    if name in ("replicated", "auto"):  # auto: no launcher chose a sharded backend
        return ReplicatedBackend(env, cfg.optim, cfg.train.seed)
    if name == "fsdp2":
        from .fsdp2_backend import FSDP2Backend

        return FSDP2Backend(env, cfg.optim, cfg.distributed.fsdp, cfg.train.seed)
    if name == "zero":
        from .zero_backend import ZeROBackend

        return ZeROBackend(env, cfg.optim, cfg.distributed.zero, cfg.train)
    raise ValueError(f"distributed.backend={name!r}: unknown")
