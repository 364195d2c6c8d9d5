"""Export the kept adapters as a standard peft LoRA adapter folder, atomically.

The folder (adapter_config.json + adapter_model.safetensors) loads with
``PeftModel.from_pretrained(base, folder)`` and in serving engines, without this project.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .weight_lora import WeightLoRA


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


def save_peft_adapter(
    state: dict[str, torch.Tensor], wl: WeightLoRA, out_dir: Path, base_model_name_or_path: str
) -> Path:
    """Write ``state`` (from ``wl.export_state()`` or a gathered copy) as a peft adapter."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        wl.export_config(base_model_name_or_path).save_pretrained(str(tmp))
        replace_dir_atomically(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
