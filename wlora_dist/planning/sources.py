"""Where the planner's inputs come from: a preset (presets.json), a config.json, a model
folder or a hub id's cached config; and a run config turned into a PlanInput. Everything
here reads files or libraries; memory_plan.py is the arithmetic on what this returns."""

from __future__ import annotations

import json
from pathlib import Path

from wlora_dist.config import RunConfig
from wlora_dist.distributed.settings import precision_of
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.planning.memory_plan import QUANT_BASE, PlanInput
from wlora_dist.planning.shapes import FUSED_FAMILIES, ModelShape

# Llama 3 shapes, and other families' from their config.json on the hub (or give the file or
# folder itself): name -> ModelShape fields.
PRESETS: dict[str, ModelShape] = {
    name: ModelShape(**fields)
    for name, fields in json.loads((Path(__file__).with_name("presets.json")).read_text()).items()
}


def complete_hf_config(cfg: dict) -> dict:
    """``cfg`` with its class defaults, through transformers' AutoConfig (the text config
    of a multimodal one); as it is when transformers does not know its model_type."""
    from transformers import AutoConfig

    fields = dict(cfg.get("text_config") or cfg)
    model_type = fields.pop("model_type", None) or cfg.get("model_type")
    if not model_type:
        return fields
    try:
        full = AutoConfig.for_model(model_type, **fields).get_text_config()
    except (ValueError, KeyError, TypeError):
        return {**fields, "model_type": model_type}
    return {**full.to_dict(), "model_type": full.model_type}


def shape_of_hf_config(cfg: dict) -> ModelShape:
    """From a config.json's fields. A saved config leaves out the values equal to its
    class's defaults (Gemma's tied embeddings, for one): transformers' config class for
    the model_type fills them in; the text part of a multimodal config is used."""
    cfg = complete_hf_config(cfg)
    return ModelShape(
        hidden=int(cfg["hidden_size"]),
        intermediate=int(cfg["intermediate_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=int(cfg["num_attention_heads"]),
        kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        vocab=int(cfg["vocab_size"]),
        head_dim=int(cfg.get("head_dim") or 0),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        fused=cfg.get("model_type") in FUSED_FAMILIES,
    )


def run_plan_input(
    cfg: RunConfig,
    shape: ModelShape,
    world_size: int,
    backend: BackendSpec,
    on_gpu: bool = True,
    kept: list[tuple[int, str]] | None = None,
) -> PlanInput:
    """The plan of a run config (its adapter, selection, batch and base settings) on
    ``backend``, the spec ``resolve_backend`` gave the run."""
    float_base = "bf16" if on_gpu and cfg.model.dtype in ("auto", "bfloat16", "float16") else "fp32"
    return PlanInput(
        shape,
        world_size=world_size,
        backend=backend,
        base=QUANT_BASE.get(cfg.model.quantization, float_base),  # type: ignore[arg-type]
        blocksize_4bit=cfg.model.bnb_4bit_blocksize,
        double_quant_4bit=cfg.model.bnb_4bit_use_double_quant,
        compute="bf16" if precision_of(cfg, on_gpu).bf16 else "fp32",
        lora_rank=cfg.adapter.lora_rank << cfg.selection.rounds,  # WeightLoRA+: the final rank
        targets=tuple(cfg.adapter.target_modules),
        lora_layers=tuple(cfg.adapter.layers) if cfg.adapter.layers is not None else None,
        lora_dropout=cfg.adapter.lora_dropout,
        k=cfg.selection.k,
        micro_batch=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum_steps,
        seq_len=cfg.data.seq_len,
        activation_checkpointing=cfg.model.gradient_checkpointing,
        checkpoint_every=cfg.model.checkpoint_every_n_layers,
        loss_shards=cfg.train.loss_shards,
        offload_activations=cfg.train.offload_activations,
        gpu_gib=cfg.memory.budget_gib or 80.0,
        reserve_gib=cfg.memory.reserve_gib,
        kept=tuple(kept) if kept is not None else None,
    )


def shape_from(model: str) -> ModelShape:
    """A preset name, an HF config.json, or a model folder holding one."""
    import json
    import os

    if model in PRESETS:
        return PRESETS[model]
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path) and "/" in model and not os.path.exists(os.path.expanduser(model)):
        # A hub id: its config.json from the local HF cache (never downloaded here), else
        # the Llama 3 preset its name says.
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json", local_files_only=True)
        except Exception:  # not cached: fall back on the name
            name = model.lower().replace("_", "-")
            for size, preset in (
                ("70b", "llama3-70b"),
                ("8b", "llama3-8b"),
                ("3b", "llama3.2-3b"),
                ("1b", "llama3.2-1b"),
            ):
                if "llama-3" in name and f"-{size}" in name:
                    return PRESETS[preset]
    if not os.path.isfile(path):
        from wlora_dist.errors import UserError

        raise UserError(
            f"--model {model!r}: not a preset ({', '.join(PRESETS)}), a config.json or a model folder with one"
        )
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    full = complete_hf_config(cfg)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size") if k not in full]
    if missing:
        from wlora_dist.errors import UserError

        raise UserError(
            f"{path}: no {', '.join(missing)} (model_type {full.get('model_type')!r}); the planner knows decoder "
            "configs of the Llama, Qwen2/3, Mistral, Gemma 1/2/3 and Phi-3 kind"
        )
    return shape_of_hf_config(cfg)
