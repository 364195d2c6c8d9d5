"""Loading a model too large for one rank: build it on the meta device, shard it with
FSDP2, then let each rank read only its own rows of every weight from the safetensors
files. No rank ever holds a full copy of the model, in CPU or accelerator memory.

This is written by hand because transformers' loader materialises each full tensor on
every rank before FSDP2 could shard it; torchtune does the same by hand for the same
reason (``load_from_full_model_state_dict``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .config import ModelConfig
from .modeling import check_model_path, resolve_dtype
from .weight_lora import ADAPTER, WeightLoRA, initial_adapter_weights


@dataclass(frozen=True)
class LoadStats:
    bytes_read: int  # bytes this rank read from the checkpoint (its share of the base)
    tensors: int


def build_on_meta(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """The model's structure with no storage: parameters on the meta device."""
    check_model_path(cfg.path)
    config = AutoConfig.from_pretrained(os.path.expanduser(cfg.path), trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=resolve_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code
        )
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def is_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index of a sharded checkpoint or the one file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), "pt", device="cpu") as f:
        return dict.fromkeys(f.keys(), single)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's storage of ``param`` and the global index of its first row (dim 0)."""
    if not isinstance(param, DTensor):
        return param, 0
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), int(offset[0]) if offset else 0


def materialize_sharded(wl: WeightLoRA, model_path: str, device: torch.device, seed: int) -> LoadStats:
    """Allocate this rank's shards (``to_empty``) and fill them: base rows from the
    checkpoint, adapters with their deterministic init, rotary buffers recomputed."""
    wl.peft_model.to_empty(device=device)
    files = _checkpoint_files(Path(os.path.expanduser(model_path)))
    read = count = 0
    handles: dict[Path, object] = {}
    try:
        with torch.no_grad():
            for name, param in wl.base_model.named_parameters():
                if ".lora_" in name:
                    continue
                key = name.replace(".base_layer.", ".")
                if key not in files:
                    raise KeyError(f"{key}: not in the checkpoint at {model_path}")
                if files[key] not in handles:
                    handles[files[key]] = safe_open(str(files[key]), "pt", device="cpu")
                local, start = local_rows(param)
                if local.numel() == 0:
                    continue
                rows = handles[files[key]].get_slice(key)[start : start + local.shape[0]]  # type: ignore[attr-defined]
                local.copy_(rows)
                read += rows.numel() * rows.element_size()
                count += 1
            for site in wl.sites:
                layer = wl.lora_layer(site)
                a_full, b_full = initial_adapter_weights(
                    site, layer.lora_A[ADAPTER].weight.shape, layer.lora_B[ADAPTER].weight.shape, seed
                )
                for param, full in ((layer.lora_A[ADAPTER].weight, a_full), (layer.lora_B[ADAPTER].weight, b_full)):
                    local, start = local_rows(param)
                    local.copy_(full[start : start + local.shape[0]])
    finally:
        handles.clear()
    _recompute_rotary(wl.base_model, device)
    return LoadStats(read, count)


def _recompute_rotary(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints; after to_empty they are garbage.
    Llama's only ones are the rotary frequencies: rebuild them from the config."""
    for name, module in model.named_modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        if not non_persistent:
            continue
        if "rotary" not in type(module).__name__.lower():
            raise NotImplementedError(f"{name} ({type(module).__name__}) has non-persistent buffers {non_persistent}")
        fresh = type(module)(config=module.config).to(device)
        for buf in non_persistent:
            setattr(module, buf, getattr(fresh, buf))
