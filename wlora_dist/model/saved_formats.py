"""Which format a model folder was saved in, and what that asks of the run: the
safetensors files that hold its tensors, whether transformers saved it quantised by
bitsandbytes (8-bit or 4-bit, and with which 4-bit settings), and one message for a
weights file that cannot be read. Every module that reads a model folder asks here
(loading, the sharded reader, the preflight, the merged export); this module reads only
config.json and safetensors headers."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from wlora_dist.config import ModelConfig
from wlora_dist.errors import UserError
from wlora_dist.model.bnb import require_bitsandbytes

QUANT_STATE_KEY = ".weight.quant_state.bitsandbytes__"  # + nf4 / fp4: bnb's packed non-tensor state


class ModelPathError(UserError):
    """model.path is not a model this run can read."""


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


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index of a sharded checkpoint or the one file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(
            f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints "
            "are loaded: pickled .bin files can run code)"
        )
    with unreadable_weights_are_user_errors(str(folder)), safe_open(str(single), "pt", device="cpu") as f:
        return dict.fromkeys(f.keys(), single)


def checkpoint_quantization(folder: str) -> str:
    """ "int8" / "4bit" for a folder saved by transformers + bitsandbytes, else "none"."""
    path = os.path.join(os.path.expanduser(folder), "config.json")
    if not os.path.isfile(path):
        return "none"  # a hub id: resolved by transformers
    with open(path) as f:
        q = json.load(f).get("quantization_config") or {}
    if q.get("load_in_8bit"):
        return "int8"
    if q.get("load_in_4bit"):
        return "4bit"
    return "none"


def check_checkpoint_quantization(cfg: ModelConfig) -> None:
    """A folder saved quantised is trained only with the matching model.* settings."""
    folder, quantization = cfg.path, cfg.quantization
    saved = checkpoint_quantization(folder)
    if saved == "4bit":
        check_saved_4bit(cfg)
    if saved == "int8" and quantization != "int8":
        raise UserError(
            f"model.path={folder!r} is saved in bitsandbytes 8-bit; set model.quantization: int8 to train on it "
            "(or give the bf16/fp16 folder)"
        )


def read_quant_state(file: str | Path, key: str) -> dict[str, Any]:
    """The non-tensor part of a saved bnb 4-bit weight's state (quant_type, blocksize,
    shape, nested_offset, ...), unpacked as bnb's ``QuantState.from_dict`` does."""
    with safe_open(str(file), "pt", device="cpu") as f:
        packed = f.get_tensor(key)
    return require_bitsandbytes("nf4 / fp4").functional.unpack_tensor_to_dict(packed)


def saved_4bit_settings(folder: str) -> dict[str, Any]:
    """What a folder saved by transformers in bnb 4-bit was quantised with."""
    root = Path(os.path.expanduser(folder))
    q = json.loads((root / "config.json").read_text()).get("quantization_config") or {}
    files = checkpoint_files(root)
    key = next((k for k in files if QUANT_STATE_KEY in k), None)
    if key is None:
        raise UserError(f"model.path={folder!r}: config.json says 4-bit, but no tensor has a bitsandbytes quant_state")
    state = read_quant_state(files[key], key)
    return {
        "quant_type": state.get("quant_type", q.get("bnb_4bit_quant_type", "fp4")),
        "double_quant": "nested_offset" in state,
        "blocksize": int(state["blocksize"]),
    }


def check_saved_4bit(cfg: ModelConfig) -> None:
    """A 4-bit folder is read as it is: the run's model.* settings must be the folder's."""
    saved = saved_4bit_settings(cfg.path)
    fix = []
    if cfg.quantization != saved["quant_type"]:
        fix.append(f"model.quantization: {saved['quant_type']}")
    if bool(cfg.bnb_4bit_use_double_quant) != saved["double_quant"]:
        fix.append(f"model.bnb_4bit_use_double_quant: {str(saved['double_quant']).lower()}")
    if cfg.quantization in ("nf4", "fp4") and cfg.bnb_4bit_blocksize != saved["blocksize"]:
        fix.append(f"model.bnb_4bit_blocksize: {saved['blocksize']}")
    if fix:
        raise UserError(
            f"model.path={cfg.path!r} is saved in bitsandbytes 4-bit ({saved['quant_type']}, blocksize "
            f"{saved['blocksize']}, double quantisation {'on' if saved['double_quant'] else 'off'}) and is read as "
            f"it is; set {', '.join(fix)} to train on it (or give the bf16/fp16 folder, quantised as it loads)"
        )
