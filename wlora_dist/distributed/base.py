"""The backend interface: how the model is wrapped, how adapter gradients are reduced, and
who owns the optimizer. The trainer and the selector talk to this interface only; the
replicated, FSDP2 and DeepSpeed ZeRO backends implement it (registry.py builds the one a
``BackendSpec`` names).

The gate vector is never the backend's business: it lives outside the model and the
selector all-reduces its gradient itself (method/selector.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import PreTrainedModel

from wlora_dist.config import ModelConfig
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.settings import BackendSettings
from wlora_dist.method.weight_lora import AdapterSite, WeightLoRA
from wlora_dist.model.checkpoint_reader import CheckpointReader
from wlora_dist.model.loading import load_base_model
from wlora_dist.model.sharded_loading import Held, LoadStats, build_on_meta, is_on_meta, materialize_sharded

# Where a model built on meta gets its base weights: a reader factory (default: the
# checkpoint at model.path; the benchmarks pass random weights).
WeightsSource = Callable[[nn.Module], CheckpointReader]


# One adapter matrix's state in a checkpoint: its weight (ADAPTER_WEIGHT) and its AdamW
# state (exp_avg, exp_avg_sq, step), full or this rank's shard as the backend holds it.
AdapterState = dict[str, torch.Tensor]
ADAPTER_WEIGHT = "weight"


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Backend(ABC):
    def __init__(self, settings: BackendSettings, env: DistEnv, weights: WeightsSource | None = None) -> None:
        self.settings = settings
        self.spec = settings.spec
        self.env = env
        self.optim_cfg = settings.optim
        self.seed = settings.seed  # of the deterministic adapter init of models built on meta
        self.weights = weights
        self.optimizer: torch.optim.Optimizer | None = None
        # The trainable parameters as this backend holds them (DTensors under FSDP2, ZeRO-3
        # parameters): set by prepare() and by every layout change; the one list the
        # optimizer steps and the trainer reads.
        self.params: list[nn.Parameter] = []
        self._module: nn.Module | None = None
        self.model_path = ""
        self.load_stats: LoadStats | None = None
        self.loaded_partitioned: bool | None = None  # ZeRO-3: every weight partitioned as created

    @property
    def name(self) -> str:
        return self.spec.name

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
        if cfg.quantization != "none":
            return build_on_meta(cfg, self.env.device)
        return load_base_model(cfg, self.env.device)

    def _materialize_if_meta(self, wl: WeightLoRA, device: torch.device | None = None) -> None:
        """Fill a model built on meta (all of it, or this rank's shards): base from the
        checkpoint (or ``weights``), adapters with their deterministic init."""
        if is_on_meta(wl.peft_model):
            reader = self.weights(wl.base_model) if self.weights is not None else None
            device = device or self.env.device
            self.load_stats = materialize_sharded(
                wl, self.model_path, device, self.seed, reader, self.held, self.assign_full
            )

    def prepare(self, wl: WeightLoRA) -> nn.Module:
        """Place / wrap / shard ``wl.peft_model``, build the optimizer over its trainable
        parameters (then ``self.params``); return the module to call for forward."""
        module = self._prepare(wl)
        self.params = wl.trainable_parameters()  # after wrapping: DTensors under FSDP2
        return module

    @abstractmethod
    def _prepare(self, wl: WeightLoRA) -> nn.Module:
        """prepare() of one backend."""

    @abstractmethod
    def reduce_gradients(self) -> None:
        """Make every rank's .grad of ``self.params`` the mean over the data-parallel group."""

    # -- the adapter layout changes (prune event, WeightLoRA+ round, resume) ---------------

    def adapters_changed(self, wl: WeightLoRA, replaced: list[AdapterSite], keep_state: bool) -> None:
        """The one call after the adapter layout changed: adapters were removed and those of
        ``replaced`` got new modules. Wrap the new ones as prepare() did, drop everything held
        of the removed ones, and an optimizer over what is left (``self.params``), Adam state
        carried over for unchanged adapters if ``keep_state``."""
        self._rebuild(wl, replaced, keep_state)
        self.params = wl.trainable_parameters()  # after wrapping: DTensors under FSDP2

    def _rebuild(self, wl: WeightLoRA, replaced: list[AdapterSite], keep_state: bool) -> None:
        self._rebuild_optimizer(wl.trainable_parameters(), keep_state)

    def build_optimizer(self, params: list[nn.Parameter]) -> None:
        """AdamW over ``params`` (WeightLoRA.trainable_parameters: A, B of each kept adapter
        in turn). Under LoRA+ (optim.loraplus_lr_ratio != 1) the B matrices are a group of
        their own whose learning rate is the schedule's times the ratio (``lr_scale``)."""
        c = self.optim_cfg
        ratio = c.loraplus_lr_ratio
        groups = [{"params": params, "lr_scale": 1.0}]
        if ratio != 1.0:
            groups = [{"params": params[0::2], "lr_scale": 1.0}, {"params": params[1::2], "lr_scale": ratio}]
        self.optimizer = torch.optim.AdamW(
            groups, lr=c.lr, betas=(c.betas[0], c.betas[1]), eps=c.eps, weight_decay=c.weight_decay
        )
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * group["lr_scale"]

    def _rebuild_optimizer(self, kept: list[nn.Parameter], keep_state: bool) -> None:
        """A new AdamW over ``kept`` at the current LR; Adam state carried over if asked."""
        old = self.optimizer
        assert old is not None
        lr = old.param_groups[0]["lr"] / old.param_groups[0].get("lr_scale", 1.0)
        self.build_optimizer(kept)
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if keep_state:
            for p in kept:
                if p in old.state:
                    self.optimizer.state[p] = old.state[p]
        old.state.clear()
        old.param_groups.clear()

    # -- one optimizer step ----------------------------------------------------------------

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        """Backward of one micro-step (``loss`` already divided by the accumulation steps)."""
        loss.backward()

    def clip_grad_norm(self, max_norm: float, extra_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Clip to ``max_norm``; ``extra_norm``: the norm of gradients clipped with these
        (the gates' under selection.clip_gates) counts in the total, as one clip over both."""
        params = self.params
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # DTensor grads (FSDP2): the norm is all-reduced
            norm = norm.full_tensor()
        if extra_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([norm, extra_norm.to(norm)]))
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def step(self, lr: float, max_grad_norm: float, extra_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Clip, then one optimizer step at ``lr``; returns the gradient norm before clipping
        (a tensor: reading it is a host sync the caller does when it logs). ``extra_norm``:
        see clip_grad_norm."""
        assert self.optimizer is not None
        norm = self.clip_grad_norm(max_grad_norm, extra_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)

    def release_gathered(self) -> None:
        """After a forward without backward (eval, the probe loss): free whatever that
        forward left gathered, so a rank holds its shard again. FSDP2 reshards each unit
        after its forward by itself; ZeRO-3 does not (zero.py)."""
        return None

    # -- full tensors of sharded parameters ------------------------------------------------

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        """The unsharded shape of ``param`` (a DTensor's shape already is)."""
        return param.shape

    def numel(self, param: torch.Tensor) -> int:
        return self.full_shape(param).numel()

    def held(self, param: torch.Tensor) -> Held:
        """What this rank holds of ``param``: all of it, or its rows of a dim-0-sharded
        DTensor (FSDP2). Sharded loading asks this; it knows no backend."""
        local, start = local_rows(param)
        return Held(local, param.shape, start, start + (local.shape[0] if local.dim() else 1))

    def assign_full(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Write the full ``value`` into ``param``: all of it, or this rank's rows of a
        dim-0-sharded DTensor (FSDP2)."""
        h = self.held(param)
        with torch.no_grad():
            h.local.copy_(value[h.start : h.stop])

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full (unsharded) copies of ``tensors``; a collective where they are sharded."""
        return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]

    # -- checkpoints -----------------------------------------------------------------------

    def adapter_state(self, named: dict[str, nn.Parameter], for_load: bool) -> dict[str, AdapterState]:
        """Each adapter matrix and its AdamW state, by the name it is given (the checkpoint
        package names them on disk): here the live tensors themselves (DTensor shards under
        FSDP2), so a checkpoint load fills them in place. AdamW state not created yet (before
        the first step after a rebuild) is created now as zeros, which AdamW treats exactly
        as a fresh state."""
        assert self.optimizer is not None
        out: dict[str, AdapterState] = {}
        for name, p in named.items():
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)  # AdamW's own format
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out[name] = {
                ADAPTER_WEIGHT: p.detach(),
                "exp_avg": state["exp_avg"],
                "exp_avg_sq": state["exp_avg_sq"],
                "step": state["step"].view(1),
            }
        return out

    def load_adapter_state(self, named: dict[str, nn.Parameter], states: dict[str, AdapterState]) -> None:
        """After a checkpoint load filled ``states`` (from ``adapter_state(for_load=True)``);
        nothing to do here, where they were the live tensors."""
        return None

    # -- what this rank holds --------------------------------------------------------------

    def memory_report(self) -> dict[str, int]:
        """This rank's bytes of trainable parameters, gradients and optimizer state."""
        params = self.params
        state = self.optimizer_state_tensors() if self.optimizer is not None else []
        return {
            "trainable_param_bytes": tensor_bytes([local_part(p) for p in params]),
            "grad_bytes": tensor_bytes([local_part(p.grad) for p in params if p.grad is not None]),
            "optimizer_state_bytes": tensor_bytes([local_part(t) for t in state]),
        }

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of this rank's optimizer state (for counting resident bytes)."""
        assert self.optimizer is not None
        return [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def base_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """This rank's bytes of the frozen base between steps, per dtype: its shard (FSDP2
    DTensor / ZeRO-3 partition) plus any full copy it keeps."""
    out: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            continue
        held = [local_part(p)]
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, plus .data if not released
            held = [p.ds_tensor, p.data]
            if getattr(p, "ds_secondary_tensor", None) is not None:  # hpZ's second partition
                held.append(p.ds_secondary_tensor)
        key = str(held[0].dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + tensor_bytes(held)
    return out


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's storage of ``param`` and the global index of its first row (dim 0)."""
    if not isinstance(param, DTensor):
        return param, 0
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), int(offset[0]) if offset else 0


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded DTensor) tensor held by this rank."""
    return t.to_local() if hasattr(t, "to_local") else t
