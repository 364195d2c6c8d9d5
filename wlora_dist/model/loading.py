"""Loading the frozen base model and its tokenizer (local folder or hub id)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from wlora_dist.config import ModelConfig
from wlora_dist.errors import UserError
from wlora_dist.model.int8 import check_checkpoint_quantization
from wlora_dist.paths import looks_local


class ModelPathError(UserError):
    """A model path that does not exist or is not an HF model folder."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_path(path: str) -> None:
    if looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ModelPathError(
            f"model.path={path!r}: no such folder; give an HF model folder (with config.json) or a hub id"
        )
    if looks_local(path) and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
        raise ModelPathError(f"model.path={path!r}: folder has no config.json; is it an HF model folder?")
    folder = os.path.expanduser(path)
    if looks_local(path) and not any(
        f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(folder)
    ):
        pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise ModelPathError(
            f"model.path={path!r}: no safetensors weights"
            + (f" (found {', '.join(pickled)}: pickled files can run code and are never loaded)" if pickled else "")
            + "; convert once with transformers: AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder, safe_serialization=True)"
        )


def load_tokenizer(cfg: ModelConfig):
    check_model_path(cfg.path)
    tok = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.path), trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # Llama tokenizers ship without a pad token
    return tok


def load_base_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """The frozen base in ``model.dtype``; every base parameter has requires_grad False."""
    check_model_path(cfg.path)
    check_checkpoint_quantization(cfg.path, cfg.quantization)
    with unreadable_weights_are_user_errors(cfg.path):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(cfg.path),
            dtype=resolve_dtype(cfg.dtype, device),
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights
        )
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_every_n_layers)
    model.config.use_cache = False
    return model


def enable_checkpointing(model: PreTrainedModel, every_n_layers: int = 1) -> None:
    """Activation checkpointing of decoder layers 0, N, 2N, ... (transformers' own)."""
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers
    )


@contextlib.contextmanager
def unreadable_weights_are_user_errors(path: str) -> Iterator[None]:
    """A weights file safetensors cannot read (truncated by a copy, a full disk, a partial
    download) is the user's to fix: one message naming the folder, not a library traceback."""
    try:
        yield
    except SafetensorError as e:
        raise ModelPathError(
            f"model.path={path!r}: a weights file cannot be read ({e}); it is damaged or truncated: copy or "
            "download the model again (compare the file sizes with the source)"
        ) from None
