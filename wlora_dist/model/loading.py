"""Loading the frozen base model and its tokenizer (local folder or hub id)."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from wlora_dist.config import ModelConfig
from wlora_dist.model.saved_formats import (
    ModelPathError,
    check_checkpoint_quantization,
    unreadable_weights_are_user_errors,
)
from wlora_dist.paths import local_model_problem, looks_local


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_path(path: str) -> None:
    if not looks_local(path):
        check_hub_model(path)
        return
    problem = local_model_problem(path)
    if problem:
        raise ModelPathError(problem)


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the Hub cannot be reached, or None. One TCP connection, a few seconds at most:
    without it, transformers retries five times with back-off (~25 s) and then raises a
    traceback. Behind an HTTP(S) proxy the check is left to transformers."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def check_hub_model(repo_id: str) -> None:
    """A hub id is usable if it is in the local HF cache or the Hub can be reached."""
    if _hub_cached(repo_id):
        return
    how = (
        f"download it where there is network (`hf download {repo_id} --local-dir DIR`) and set model.path "
        "to DIR, or point HF_HOME at a cache that holds it"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelPathError(
            f"model.path={repo_id!r}: not a local folder, not in the HF cache, and HF_HUB_OFFLINE is set; {how}"
        )
    why = _hub_unreachable()
    if why is not None:
        raise ModelPathError(
            f"model.path={repo_id!r}: not a local folder, not in the HF cache, and the Hub cannot be reached "
            f"({why}); {how}"
        )


def check_model_type(cfg: ModelConfig) -> dict:
    """config.json's model_type is one this transformers knows, or one whose code the
    repository ships and model.trust_remote_code allows. Returns config.json's contents."""
    import transformers
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config, _ = PretrainedConfig.get_config_dict(os.path.expanduser(cfg.path))
    except (OSError, ValueError) as e:
        raise ModelPathError(f"model.path={cfg.path!r}: its config.json cannot be read ({e})") from None
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return config
    if "auto_map" in config and not cfg.trust_remote_code:
        raise ModelPathError(
            f"model.path={cfg.path!r}: model_type {model_type!r} is defined by code shipped with the model "
            f"(config.json auto_map), not by transformers {transformers.__version__}; set "
            "model.trust_remote_code: true if you trust that code"
        )
    if "auto_map" not in config:
        raise ModelPathError(
            f"model.path={cfg.path!r}: model_type {model_type!r} is unknown to transformers "
            f"{transformers.__version__}; upgrade transformers, or check config.json"
        )
    return config


def load_tokenizer(cfg: ModelConfig):
    check_model_path(cfg.path)
    tok = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.path), trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # Llama tokenizers ship without a pad token
    return tok


def load_base_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """The frozen base in ``model.dtype``; every base parameter has requires_grad False."""
    check_model_path(cfg.path)
    check_checkpoint_quantization(cfg)
    with unreadable_weights_are_user_errors(cfg.path):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(cfg.path),
            dtype=resolve_dtype(cfg.dtype, device),
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights
            attn_implementation=cfg.attention,
        )
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_every_n_layers)
    model.config.use_cache = False
    return model


def enable_checkpointing(model: PreTrainedModel, every_n_layers: int = 1) -> None:
    """Activation checkpointing of decoder layers 0, N, 2N, ... (transformers' own)."""
    remove_input_require_grads(model)  # enabling again (a re-plan) must not add a second hook
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers
    )


def disable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing off, and the input embeddings' output no longer made to
    require grad: without checkpointing, the layers before the first adapter then build no
    graph and keep nothing for backward (what the planner plans)."""
    model.activation_checkpointing_disable()
    remove_input_require_grads(model)


def remove_input_require_grads(model: PreTrainedModel) -> int:
    """Remove every hook ``enable_input_require_grads`` put on the input embeddings; returns
    how many. transformers' ``activation_checkpointing_enable`` registers one and peft's
    ``get_peft_model`` another on a model with checkpointing on, and transformers'
    ``disable_input_require_grads`` only knows the last one registered, so the first one
    outlived a re-plan that switched checkpointing off (the layers before the first adapter
    kept their activations: 12% over the plan on the tiny-cpu benchmark). Found by the
    hook's name (tests/test_private_apis.py checks transformers still calls it that)."""
    hooks = model.get_input_embeddings()._forward_hooks
    ours = [key for key, hook in hooks.items() if getattr(hook, "__name__", "") == "make_inputs_require_grads"]
    for key in ours:
        del hooks[key]
    if hasattr(model, "_require_grads_hooks"):
        model._require_grads_hooks = []
    return len(ours)
