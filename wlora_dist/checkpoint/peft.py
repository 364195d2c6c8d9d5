"""The kept adapters as a standard peft LoRA adapter folder, written atomically: from a run
(its final export) or from a checkpoint (``wlora-dist export``), and the merged model.

The folder (adapter_config.json + adapter_model.safetensors) loads with
``PeftModel.from_pretrained(base, folder)`` and in serving engines, without this project.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from wlora_dist.checkpoint import keys
from wlora_dist.checkpoint.folders import check_intact
from wlora_dist.checkpoint.meta import read_meta
from wlora_dist.checkpoint.storage import stored_tensors
from wlora_dist.method.weight_lora import WeightLoRA, peft_entries


def replace_dir_atomically(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` folder to ``final``; an old ``final`` survives any crash
    before the last rename (it is moved aside first, removed only after)."""
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old)


def write_dir_atomically(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """``fill`` writes a folder's files into a fresh folder beside ``out_dir``, which then
    replaces ``out_dir`` (``replace_dir_atomically``); on any error the partial folder is
    removed and an existing ``out_dir`` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        fill(tmp)
        # mkdtemp makes the folder 0700 and safetensors its files 0600: as the user's umask
        # says instead, so teammates on a shared filesystem can read the result.
        mask = _umask()
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        replace_dir_atomically(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def model_reference(path: str) -> str:
    """base_model_name_or_path as the user gave it: a hub id unchanged, a local folder
    absolute (so the adapter still finds its base when opened from elsewhere)."""
    from wlora_dist.paths import looks_local

    return os.path.abspath(os.path.expanduser(path)) if path and looks_local(path) else path


def model_card(config: LoraConfig, n_sites: int, summary: dict[str, Any]) -> str:
    """README.md of an adapter folder: what it is, what the selection kept, how to load it."""
    kept = sorted(config.target_modules or [])
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {config.base_model_name_or_path}",
        "tags: [lora, weightlora, wlora_dist]",
        "---",
        "",
        f"# WeightLoRA adapter: {len(kept)} of {n_sites} LoRA adapters kept",
        "",
        f"Base model: `{config.base_model_name_or_path}`. LoRA r = {config.r}, alpha = {config.lora_alpha}"
        + (f", per-module ranks {dict(config.rank_pattern)}" if config.rank_pattern else "")
        + ". The gates are folded into B: this is a plain peft LoRA adapter.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary.items()],
        "",
        "Kept modules:",
        "",
        *[f"- `{m}`" for m in kept],
        "",
        "Load it:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{config.base_model_name_or_path}")',
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        "```",
    ]
    return "\n".join(lines) + "\n"


def save_peft_adapter(
    state: dict[str, torch.Tensor],
    wl: WeightLoRA,
    out_dir: Path,
    base_model_name_or_path: str,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` (from ``wl.export_state()`` or a gathered copy) as a peft adapter
    with its model card."""
    config = wl.export_config(model_reference(base_model_name_or_path))
    return write_peft_adapter(state, config, out_dir, model_card(config, wl.n, summary or {}))


def write_peft_adapter(
    state: dict[str, torch.Tensor], lora_config: LoraConfig, out_dir: Path, card: str | None = None
) -> Path:
    """adapter_model.safetensors + adapter_config.json (+ README.md, the model card),
    written aside and moved into place."""

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_config.save_pretrained(str(tmp))
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")

    return write_dir_atomically(out_dir, fill)


def lora_config_to_json(config: LoraConfig) -> dict[str, Any]:
    """A LoraConfig as plain JSON (sets as sorted lists), for checkpoint metadata."""
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def export_checkpoint(ckpt: Path, out_dir: Path, merged_out: Path | None = None, model_path: str = "") -> Path:
    """A checkpoint (any backend, any world size: it stores full tensors or all shards) as
    a peft adapter, gates folded into B exactly as the trainer's final export does; with
    ``merged_out``, also the base with the adapter merged in (needs the float base)."""
    check_intact(ckpt)
    meta = read_meta(ckpt)
    tensors = stored_tensors(ckpt, keys.ADAPTER + ".")
    gates = stored_tensors(ckpt, keys.GATES)[keys.GATES]
    state = {}
    for name in meta.kept:
        a, b = (tensors[keys.adapter_key(m)] for m in keys.matrix_names(name))
        state.update(peft_entries(name, a, b, gates[meta.sites.index(name)].float()))
    config = LoraConfig(**{k: v for k, v in meta.adapter_config.items() if k in _LORA_FIELDS})
    config.inference_mode = True
    summary = {"exported from": f"`{ckpt}` (step {meta.step})", "command": f"`wlora-dist export {ckpt}`"}
    write_peft_adapter(state, config, out_dir, model_card(config, len(meta.sites), summary))
    if merged_out is not None:
        write_merged(out_dir, model_path or config.base_model_name_or_path or "", merged_out)
    return out_dir


_LORA_FIELDS = set(LoraConfig.__dataclass_fields__)


def write_merged(adapter_dir: Path, model_path: str, out_dir: Path) -> Path:
    """Base + adapter merged (W + scaling * B A) as a full HF model folder, atomically."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wlora_dist.errors import UserError
    from wlora_dist.model.loading import check_model_path
    from wlora_dist.model.saved_formats import checkpoint_quantization

    check_model_path(model_path)
    if checkpoint_quantization(model_path) != "none":
        raise UserError(
            f"--merged: {model_path} is saved quantised; merging into int8 weights would lose the adapter. "
            "Pass --model with the bf16/fp16 base folder"
        )
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        with contextlib.suppress(OSError, ValueError):  # a model folder without a tokenizer: weights only
            AutoTokenizer.from_pretrained(model_path).save_pretrained(str(tmp))

    return write_dir_atomically(out_dir, fill)


def _umask() -> int:
    """The process umask (reading it means setting it; set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
