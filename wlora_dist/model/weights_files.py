"""A model folder's safetensors files, read as far as their headers: every file parses, holds
every byte its header declares (a copy cut short by a full disk or an interrupted download
is found before the load), and its tensors have the shapes the model's config.json gives.

safetensors has no such check of its own short of reading every tensor: a truncated file
opens, and fails only when the missing tensor is read, minutes into a sharded load.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from wlora_dist.errors import UserError


class WeightsFileError(UserError):
    """A weights file that is damaged, cut short, or not of this model."""


def weights_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (the index's, where there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def read_header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares: name -> {dtype, shape, data_offsets}."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsFileError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsFileError(f"{path}: its header declares {n} bytes, the file holds {size}: it is truncated")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f"{path}: the header is not readable ({e}): the file is damaged") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        cut = next(name for name, t in header.items() if 8 + n + t["data_offsets"][1] > size)
        raise WeightsFileError(
            f"{path}: {size} bytes, but its tensors need {8 + n + end} (cut off at {cut!r} or before): it is "
            "truncated; copy or download the model again (compare the file sizes with the source)"
        )
    return header


def check_weights_files(folder: str, shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Every weights file of local model folder ``folder`` whole, and (``shapes``: the
    model's parameter shapes from config.json, None for a folder saved quantised) every
    tensor the model has found with that shape."""
    root = Path(os.path.expanduser(folder))
    found: dict[str, tuple[int, ...]] = {}
    for path in weights_files(root):
        if not path.is_file():
            raise WeightsFileError(f"model.path={folder!r}: {path.name}, named in the index, is missing")
        try:
            header = read_header(path)
        except WeightsFileError as e:
            raise WeightsFileError(f"model.path={folder!r}: a weights file cannot be read: {e}") from None
        found.update({name: tuple(t["shape"]) for name, t in header.items()})
    if shapes is None:
        return
    missing = [name for name in shapes if name not in found]
    if missing:
        raise WeightsFileError(
            f"model.path={folder!r}: the weights lack {len(missing)} of the {len(shapes)} tensors its config.json "
            f"gives the model (first: {missing[0]!r}); they would be trained from random values. Is the folder "
            "complete, and its config.json the one its weights were saved with?"
        )
    wrong = [(name, found[name], shape) for name, shape in shapes.items() if found[name] != shape]
    if wrong:
        name, has, want = wrong[0]
        raise WeightsFileError(
            f"model.path={folder!r}: {len(wrong)} tensor(s) of another shape than config.json gives (first: "
            f"{name!r} is {list(has)}, the config makes it {list(want)}): the weights and config.json are of "
            "different models"
        )
