"""FSDP2 (``torch.distributed.fsdp.fully_shard``), applied by us rather than through
accelerate's plugin (which never enables FSDP without a GPU, so it could not be tested).

Wrapping, innermost first:
  1. each adapter (its lora_A and lora_B together) is its own FSDP unit, so the prune
     event can drop one adapter's sharded storage without touching anything else;
  2. each decoder layer (its frozen base linears, norms);
  3. the embedding and the lm_head, each its own unit (unless tied);
  4. the root (the final norm).
Every parameter becomes a DTensor sharded on dim 0 over the data-parallel mesh; FSDP
all-gathers per unit for forward/backward and reduce-scatters (mean) the gradients.
Under HSDP (distributed.fsdp.shard_size) the mesh is 2-D, replicas x shard group: a
parameter is sharded within its group and replicated across groups (placements
Replicate, Shard(0)); the all-gathers stay in the group, and FSDP2 all-reduces the
reduce-scattered gradients across the replicas, so every gradient is the mean over the
whole world. The gates are outside the mesh: the selector all-reduces their gradient
over every rank.
An 8-bit base (int8.py) is sharded the same way: each Int8Linear's int8 weight and its
int32-stored row scales are split on their rows and all-gathered as they are (FSDP2 casts
floating parameters only), so a rank holds 1/world of the int8 base.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from transformers import PreTrainedModel

from wlora_dist.config import ModelConfig
from wlora_dist.distributed.base import Backend, WeightsSource
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.settings import BackendSettings
from wlora_dist.method.weight_lora import ADAPTER, AdapterSite, WeightLoRA
from wlora_dist.model.blocks import decoder_layers
from wlora_dist.model.sharded_loading import build_on_meta, is_on_meta

MESH_DIMS = ("replicate", "shard")  # HSDP's 2-D mesh, the names accelerate and torchtitan use


class FSDP2Backend(Backend):
    def __init__(self, settings: BackendSettings, env: DistEnv, weights: WeightsSource | None = None) -> None:
        super().__init__(settings, env, weights)
        self.fsdp_cfg = settings.fsdp  # cpu_offload without a GPU was refused by BackendSettings.of
        self.root: FSDPModule | None = None
        self._mesh: DeviceMesh | None = None

    @property
    def mesh(self) -> DeviceMesh:
        """The data-parallel mesh, made once (a 2-D mesh makes its process groups, a
        collective call on every rank): 1-D over every rank, or replicas x shard group."""
        if self._mesh is None:
            replicas, shard = self.spec.mesh_shape(self.env.world_size)
            if replicas > 1:
                self._mesh = init_device_mesh(self.env.device.type, (replicas, shard), mesh_dim_names=MESH_DIMS)
            else:
                self._mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        return self._mesh

    def load_base(self, cfg: ModelConfig) -> PreTrainedModel:
        self.model_path = cfg.path
        if not cfg.sharded_loading and cfg.quantization == "none":
            return super().load_base(cfg)
        return build_on_meta(cfg, self.env.device)  # filled shard by shard in prepare()

    def _policies(self) -> dict:
        kwargs: dict = {"reshard_after_forward": self.fsdp_cfg.reshard_after_forward}
        if self.settings.fsdp_bf16_params:
            # bf16 compute copies of the parameters, fp32 gradient reduction.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs["offload_policy"] = CPUOffloadPolicy() if self.fsdp_cfg.cpu_offload else OffloadPolicy()
        return kwargs

    def _prepare(self, wl: WeightLoRA) -> nn.Module:
        kwargs = {**self._policies(), "mesh": self.mesh}
        model = wl.peft_model
        on_meta = is_on_meta(model)
        if not self.fsdp_cfg.cpu_offload and not on_meta:
            model.to(self.env.device)
        for site in wl.sites:
            layer = wl.lora_layer(site)
            fully_shard([layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]], **kwargs)
        for layer in decoder_layers(wl.base_model):
            fully_shard(layer, **kwargs)
        for edge in _vocab_modules(wl.base_model):
            fully_shard(edge, **kwargs)
        fully_shard(model, **kwargs)
        self.root = model  # type: ignore[assignment]
        self._module = model
        if on_meta:
            self._materialize_if_meta(wl, torch.device("cpu") if self.fsdp_cfg.cpu_offload else self.env.device)
        self.build_optimizer(wl.trainable_parameters())  # DTensors now
        return model

    def _rebuild(self, wl: WeightLoRA, replaced: list[AdapterSite], keep_state: bool) -> None:
        if replaced:
            # New (rank-doubled) adapter modules: each its own FSDP2 unit, as in prepare();
            # then FSDP2's root forgets its lazy init so the next forward registers them.
            kwargs = {**self._policies(), "mesh": self.mesh}
            for site in replaced:
                layer = wl.lora_layer(site)
                fully_shard([layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]], **kwargs)
            _reset_lazy_init(self.root)
        _forget_removed_units(self.root)
        self._rebuild_optimizer(wl.trainable_parameters(), keep_state)

    def reduce_gradients(self) -> None:
        pass  # FSDP2 reduce-scatters (mean) every gradient in backward


def _vocab_modules(model: nn.Module) -> list[nn.Module]:
    """The embedding and lm_head as units of their own (when not tied): the root unit is
    never resharded between forward and backward, so held in the root they would stay
    gathered all step (2 x vocab x hidden: 3.9 GiB per rank at 70B); as their own units
    each is gathered only while it runs."""
    inner = getattr(model, "model", None)
    embed, head = getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None)
    if embed is None or head is None or embed.weight is head.weight:
        return []
    return [embed, head]


def _reset_lazy_init(root: FSDPModule | None) -> None:
    """Make FSDP2 lazily initialise again at the next forward, over the current module
    tree: its root state then lists exactly the units now in the tree (new ones included,
    removed ones gone) and its comm context starts fresh. FSDP2 has no API to add a unit
    after the first forward; its param groups' lazy init is idempotent by design."""
    assert root is not None
    root_state = root._get_fsdp_state()
    if not getattr(root_state, "_is_root", None):
        return  # not initialised yet: nothing to redo
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module._get_fsdp_state()._is_root = None
    root_state._state_ctx.all_states.clear()


def _forget_removed_units(root: FSDPModule | None) -> None:
    """Drop FSDP2's own references to units no longer in the module tree.

    FSDP2 has no API to remove a unit. After the prune event its root state still lists
    every unit it manages (``_state_ctx.all_states``), and the comm context keeps the
    last forward's order of param groups; both keep the removed adapters' sharded
    tensors alive (docs/measurements.md: 4 of 4 weak references stayed alive). We remove exactly those
    entries, between iterations, when no collective is in flight. Tested by weak
    references in tests/test_distributed.py; fails loudly if torch changes these fields.
    """
    assert root is not None
    state = root._get_fsdp_state()
    if not getattr(state, "_is_root", None):
        return  # no forward yet (a resumed run): FSDP2's lazy init will see only the kept units
    try:
        all_states = state._state_ctx.all_states
        post_forward_order = state._comm_ctx.post_forward_order
    except AttributeError as e:  # a torch release renamed FSDP2 internals
        raise RuntimeError(f"this torch version's FSDP2 lacks {e.name!r}: cannot free removed adapters") from e
    live = {id(m) for m in root.modules()}
    all_states[:] = [s for s in all_states if any(id(m) in live for m in s._modules)]
    post_forward_order.clear()
