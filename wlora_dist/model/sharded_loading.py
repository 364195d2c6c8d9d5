"""Loading a model too large for one rank: build it on the meta device (or partitioned,
inside DeepSpeed's zero.Init), let the backend shard it, then let each rank read only what
it holds of every weight from the safetensors files. No rank ever holds a full copy of the
model, in CPU or accelerator memory. What a rank holds is the backend's to say (``Held``):
this module knows no FSDP2 and no ZeRO.

This is written by hand because transformers' loader materialises each full tensor on
every rank before FSDP2 could shard it; torchtune does the same by hand for the same
reason (``load_from_full_model_state_dict``). The reader (checkpoint_reader.py) quantises
an 8-bit or 4-bit base as it reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from wlora_dist.config import ModelConfig
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.checkpoint_reader import CheckpointReader
from wlora_dist.model.int8 import to_int8_linears
from wlora_dist.model.loading import check_model_path, enable_checkpointing, resolve_dtype
from wlora_dist.model.nf4 import to_4bit_linears
from wlora_dist.model.saved_formats import check_checkpoint_quantization


@dataclass(frozen=True)
class LoadStats:
    bytes_read: int  # bytes this rank read from the checkpoint (its share of the base)
    tensors: int


def _hf_config(cfg: ModelConfig):
    check_model_path(cfg.path)
    check_checkpoint_quantization(cfg)
    config = AutoConfig.from_pretrained(os.path.expanduser(cfg.path), trust_remote_code=cfg.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        # A folder saved in bnb 8-bit: we build plain linears and make them Int8Linear ourselves.
        del config.quantization_config
    return config


def _finish(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_every_n_layers)
    model.config.use_cache = False
    return model


def build_on_meta(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """The model's structure with no storage: parameters on the meta device (under int8,
    the quantised linears already Int8Linear)."""
    config = _hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=resolve_dtype(cfg.dtype, device),
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attention,
        )
    quantize_linears(model, cfg)
    return _finish(model, cfg)


def quantize_linears(model: nn.Module, cfg: ModelConfig) -> None:
    """Swap the (empty) linears for the quantised kind model.quantization asks for."""
    if cfg.quantization == "int8":
        to_int8_linears(model, cfg.int8_skip_modules, cfg.int8_threshold)
    elif cfg.quantization in ("nf4", "fp4"):
        compute = None if cfg.bnb_4bit_compute_dtype == "auto" else getattr(torch, cfg.bnb_4bit_compute_dtype)
        double = cfg.bnb_4bit_use_double_quant
        to_4bit_linears(model, cfg.int8_skip_modules, cfg.quantization, cfg.bnb_4bit_blocksize, compute, double)


def build_zero3_partitioned(cfg: ModelConfig, device: torch.device, ds_config: dict) -> PreTrainedModel:
    """ZeRO-3 without transformers' loader (which cannot make our Int8Linear): build inside
    deepspeed.zero.Init, so every parameter is partitioned as its module is created, swap
    the linears for Int8Linear inside it too, then fill each rank's partitions from the
    checkpoint (``fill_base`` with the ZeRO backend's ``held``). Weight init is skipped:
    everything is loaded."""
    import deepspeed
    from transformers.initialization import no_init_weights

    config = _hf_config(cfg)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=resolve_dtype(cfg.dtype, device),
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attention,
        )
        quantize_linears(model, cfg)
    return _finish(model, cfg)


def is_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _base_params(model: nn.Module):
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            yield name.replace(".base_layer.", "."), param


@dataclass(frozen=True)
class Held:
    """What this rank holds of a parameter, as its backend says (Backend.held): ``local``
    (its storage) is rows [start, stop) of dim 0 of the full ``shape``, or with ``flat``
    elements [start, stop) of the flattened tensor; ``whole``: a full copy held besides
    (a ZeRO-3 parameter kept whole), if any. The loader fills what is held and never
    needs to know which backend sharded it."""

    local: torch.Tensor
    shape: torch.Size
    start: int
    stop: int
    flat: bool = False
    whole: torch.Tensor | None = None


HeldOf = Callable[[torch.Tensor], Held]
Assign = Callable[[torch.Tensor, torch.Tensor], None]


def held_whole(param: torch.Tensor) -> Held:
    """An unsharded parameter: all of it."""
    return Held(param, param.shape, 0, param.shape[0] if param.dim() else 1)


@torch.no_grad()
def assign_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


def fill_base(model: nn.Module, reader: CheckpointReader, held: HeldOf = held_whole) -> LoadStats:
    """Fill what this rank holds of every base parameter (``held``) from ``reader``: rows,
    or a flat range, and a whole copy where one is held. Every rank calls ``prepare`` for
    every parameter in the same order (double quantisation gathers a layer's absmax)."""
    with torch.no_grad():
        prepare = getattr(reader, "prepare", None)
        for name, param in _loading_bar(list(_base_params(model))):
            if prepare is not None:
                prepare(name)
            h = held(param)
            if h.stop > h.start:
                if h.flat:
                    h.local.view(-1)[: h.stop - h.start].copy_(reader.flat(name, h.start, h.stop, h.shape))
                else:
                    h.local.copy_(reader.rows(name, h.start, h.stop))
            if h.whole is not None:
                h.whole.copy_(reader.rows(name, 0, h.shape[0]).view(h.shape))
    return LoadStats(reader.bytes_read, reader.tensors)


def materialize_sharded(
    wl: WeightLoRA,
    model_path: str,
    device: torch.device,
    seed: int,
    reader: CheckpointReader | None = None,
    held: HeldOf = held_whole,
    assign: Assign = assign_whole,
) -> LoadStats:
    """Allocate this rank's storage (``to_empty``) and fill it tensor by tensor: base
    weights from the checkpoint (what this rank holds, ``held``: its own rows under FSDP2,
    all of them otherwise; int8 weights quantised as read), adapters with their
    deterministic init (written by ``assign``), non-persistent buffers recomputed. At no
    point is more than one float tensor (or a shard of it) held beyond the model's own
    storage. ``reader``: anything with CheckpointReader's ``rows`` (the benchmarks' random
    weights); default: the checkpoint at ``model_path``."""
    wl.peft_model.to_empty(device=device)
    reader = reader or CheckpointReader(model_path, wl.base_model)
    try:
        stats = fill_base(wl.base_model, reader, held)
        wl.init_adapters(seed, assign)
    finally:
        reader.close()
    _recompute_buffers(wl.base_model, device)
    return stats


def _loading_bar(items: list) -> Iterable:
    """A progress bar on rank 0 (a 70B model's shards take minutes to read); none elsewhere,
    and none when stderr is not a terminal."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return tqdm(items, desc="loading base weights (this rank's shard)", unit="tensor", disable=None if rank0 else True)


def _recompute_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies, Gemma's embedding scale, ...) are not in
    checkpoints, and after to_empty they are garbage: compute them as the model class does,
    in a twin built from the same config with parameters on meta and buffers real
    (accelerate's init_empty_weights), and copy them over by name."""
    wanted = [(n, m) for n, m in model.named_modules() if getattr(m, "_non_persistent_buffers_set", None)]
    if not wanted:
        return
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        twin = type(model)(model.config)
    for name, module in wanted:
        source = twin.get_submodule(name)
        for buf in module._non_persistent_buffers_set:
            value = getattr(source, buf)
            if value is not None:  # in the twin's dtype, as the class computes it (rotary: float32)
                module.register_buffer(buf, value.to(device), persistent=False)
