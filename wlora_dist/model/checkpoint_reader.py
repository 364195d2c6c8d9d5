"""Reading a model's safetensors checkpoint a slice at a time: rows of a tensor, or a
flat range of its elements, named as our model names its parameters; an 8-bit or 4-bit
base quantised as it is read (or read as saved in a bitsandbytes folder). Never a whole
float tensor more than a rank asks for."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from wlora_dist.errors import UserError
from wlora_dist.model.int8 import Int8Linear, quantize_rows, scb_bits
from wlora_dist.model.nf4 import Linear4bit, double_quantize
from wlora_dist.model.saved_formats import (
    QUANT_STATE_KEY,
    checkpoint_files,
    read_quant_state,
    unreadable_weights_are_user_errors,
)

_ITEM_BYTES = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}  # safetensors dtypes a 4-bit folder stores codes in


class CheckpointReader:
    """Rows of the base model's tensors, read from its safetensors files and named as our
    model names its parameters. For an Int8Linear, ``weight`` / ``SCB`` rows come as saved
    in a bnb 8-bit folder, or quantised (bnb's quantisation) from the float rows just read:
    a rank reads and quantises only its own rows, never a whole float tensor."""

    def __init__(self, model_path: str, model: nn.Module, files: dict[str, Path] | None = None) -> None:
        """``files``: tensor name -> safetensors file (default: the folder's own; the
        benchmarks' random weights pass none and draw the float rows instead, ``_read``)."""
        self.path = model_path
        self.files = checkpoint_files(Path(os.path.expanduser(model_path))) if files is None else files
        self.int8 = {name.replace(".base_layer", "") for name, m in model.named_modules() if isinstance(m, Int8Linear)}
        self.four_bit = {
            name.replace(".base_layer", ""): m for name, m in model.named_modules() if isinstance(m, Linear4bit)
        }
        self._last_4bit: tuple[tuple[str, int, int], dict[str, torch.Tensor]] | None = None
        self._double: tuple[str, torch.Tensor | None] | None = None  # (module, its second-level absmax codes)
        self.handles: dict[Path, object] = {}
        self.bytes_read = 0
        self.tensors = 0
        self._last: tuple[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def close(self) -> None:
        self.handles.clear()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (dim 0) of parameter ``name`` (peft's ``.base_layer.`` removed)."""
        module, _, leaf = name.rpartition(".")
        if module in self.four_bit and leaf in Linear4bit.PACKED:
            return self._rows_4bit(module, leaf, start, stop)
        if leaf == "weight" and any(module + QUANT_STATE_KEY + t in self.files for t in ("nf4", "fp4")):
            raise UserError(
                f"model.path={self.path!r}: {module} is stored in 4-bit there, but this run keeps it in "
                f"model.dtype; take its name out of model.int8_skip_modules (the folder's own list is in its "
                "config.json, quantization_config.llm_int8_skip_modules)"
            )
        if module not in self.int8 or leaf not in ("weight", "SCB"):  # a bias (Qwen2's q/k/v) is read as it is
            return self._read(name, start, stop)
        if module + ".SCB" in self.files:  # saved in bnb 8-bit: read as it is
            t = self._read(f"{module}.{leaf}", start, stop)
            return scb_bits(t) if leaf == "SCB" else self._expect_int8(name, t)
        cb, scb = self._quantized(module, start, stop)
        return scb_bits(scb) if leaf == "SCB" else cb

    def flat(self, name: str, start: int, stop: int, shape: torch.Size) -> torch.Tensor:
        """Elements [start, stop) of the flattened parameter (a ZeRO-3 partition)."""
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        r0, r1 = start // cols, -(-stop // cols)
        return self.rows(name, r0, r1).reshape(-1)[start - r0 * cols : stop - r0 * cols]

    def prepare(self, name: str) -> None:
        """Called by every rank, in the same order, before parameter ``name`` is read (even
        where a rank holds none of it). Under double quantisation the first parameter of a
        4-bit layer starts the layer: its whole absmax is gathered from all ranks' rows and
        quantised once more, and the second-level state set on the layer (every rank the
        same). Nothing to do otherwise."""
        module, _, leaf = name.rpartition(".")
        layer = self.four_bit.get(module)
        if layer is None or not layer.double_quant or leaf not in Linear4bit.PACKED:
            return
        if self._double is not None and self._double[0] == module:
            return
        if self._saved_4bit(module):
            state = read_quant_state(self.files[self._state_key(module)], self._state_key(module))
            nested = self._read(module + ".weight.nested_absmax", 0, layer.nested_absmax.numel())
            layer.set_nested(nested, torch.tensor([float(state["nested_offset"])]))
            self._double = (module, None)  # the codes are read as saved
            return
        codes, nested, offset = double_quantize(self._whole_absmax(module, layer))
        layer.set_nested(nested, offset)
        self._double = (module, codes)

    def _whole_absmax(self, module: str, layer: Linear4bit) -> torch.Tensor:
        """The first-level float32 absmax of every row of ``layer`` [out, in / blocksize]:
        each rank quantises rows [rank * c, (rank + 1) * c) (c = ceil(out / world), FSDP2's
        own rows, so they stay cached for it) and all ranks all-gather the absmax."""
        import torch.distributed as dist

        out, blocks = layer.out_features, layer.in_features // layer.blocksize
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self._quantised_rows(module, 0, out)["absmax"].view(torch.float32)
        world, rank = dist.get_world_size(), dist.get_rank()
        c = -(-out // world)
        lo, hi = min(rank * c, out), min((rank + 1) * c, out)
        mine = torch.zeros(c, blocks, dtype=torch.float32)
        if hi > lo:
            mine[: hi - lo] = self._quantised_rows(module, lo, hi)["absmax"].view(torch.float32)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else mine.device
        parts = [torch.empty(c, blocks, dtype=torch.float32, device=device) for _ in range(world)]
        dist.all_gather(parts, mine.to(device))
        return torch.cat(parts)[:out].cpu()

    def _rows_4bit(self, module: str, leaf: str, start: int, stop: int) -> torch.Tensor:
        """Rows of a Linear4bit's packed codes or absmax: read as saved in a 4-bit folder, or
        quantised from the float rows (under double quantisation the absmax codes come from
        ``prepare``'s whole-layer quantisation)."""
        layer = self.four_bit[module]
        if self._saved_4bit(module):
            return self._saved_rows(module, leaf, layer, start, stop)
        if leaf == "absmax" and layer.double_quant:
            if self._double is None or self._double[0] != module:
                # A reader used outside the loaders (which call prepare on every rank): alone.
                self.prepare(module + ".weight")
            codes = self._double[1]  # type: ignore[index]
            assert codes is not None
            return codes[start:stop]
        return self._quantised_rows(module, start, stop)[leaf]

    def _quantised_rows(self, module: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The first-level quantisation (packed codes, absmax bits) of rows [start, stop). The
        module's rows quantised so far are kept (rows quantise independently), so its codes
        and absmax cost one read even where a ZeRO-3 flat partition of each covers other
        rows (they map to rows differently)."""
        layer = self.four_bit[module]
        cached = self._last_4bit
        if cached is None or cached[0][0] != module:
            lo, hi, parts = start, stop, layer.quantize(self._read(module + ".weight", start, stop))
        else:
            (_, lo, hi), parts = cached
            if start < lo:
                new = layer.quantize(self._read(module + ".weight", start, lo))
                parts, lo = {k: torch.cat([new[k], parts[k]]) for k in parts}, start
            if stop > hi:
                new = layer.quantize(self._read(module + ".weight", hi, stop))
                parts, hi = {k: torch.cat([parts[k], new[k]]) for k in parts}, stop
        self._last_4bit = ((module, lo, hi), parts)
        return {k: v[start - lo : stop - lo] for k, v in parts.items()}

    def _state_key(self, module: str) -> str:
        layer = self.four_bit[module]
        return module + QUANT_STATE_KEY + layer.quant_type

    def _saved_4bit(self, module: str) -> bool:
        return self._state_key(module) in self.files

    def _saved_rows(self, module: str, leaf: str, layer: Linear4bit, start: int, stop: int) -> torch.Tensor:
        """Rows of a layer saved by transformers in 4-bit: its codes (``weight``, flat
        [numel / 2, 1] in the folder's quant_storage dtype) and absmax (flat, one per block)
        are row-major, so rows [start, stop) are one contiguous slice of each."""
        if leaf == "weight":
            key, row_bytes = module + ".weight", layer.in_features // 2
        else:
            key = module + ".weight.absmax"
            row_bytes = (layer.in_features // layer.blocksize) * (1 if layer.double_quant else 4)
        per_row = row_bytes // _ITEM_BYTES[self._slice(key).get_dtype()]
        t = self._read(key, start * per_row, stop * per_row).contiguous().view(torch.uint8).view(stop - start, -1)
        if leaf == "weight" or layer.double_quant:
            return t
        return t.view(torch.int32)  # the float32 absmax's bytes, as its bits

    def _quantized(self, module: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (module, start, stop)
        if self._last is None or self._last[0] != key:  # weight and SCB of the same rows: one read
            self._last = (key, quantize_rows(self._read(module + ".weight", start, stop)))
        return self._last[1]

    def _expect_int8(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.int8:
            raise UserError(f"{self.path}: {name} is {t.dtype} next to an SCB; not a bitsandbytes 8-bit checkpoint")
        return t

    def _slice(self, key: str):
        """safetensors' lazy slice of tensor ``key`` (its file opened once)."""
        if key not in self.files:
            raise UserError(f"model.path={self.path!r}: the checkpoint has no tensor {key!r}; is it this model's?")
        file = self.files[key]
        with unreadable_weights_are_user_errors(self.path):
            if file not in self.handles:
                self.handles[file] = safe_open(str(file), "pt", device="cpu")
            return self.handles[file].get_slice(key)  # type: ignore[attr-defined]

    def _read(self, key: str, start: int, stop: int) -> torch.Tensor:
        sliced = self._slice(key)
        with unreadable_weights_are_user_errors(self.path):
            rows = sliced[start:stop]
        self.bytes_read += rows.numel() * rows.element_size()
        self.tensors += 1
        return rows
