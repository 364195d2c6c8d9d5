"""The frozen base in 4-bit (bitsandbytes NF4 / FP4, QLoRA's base), in a form FSDP2 and
ZeRO-3 can shard.

bitsandbytes keeps a 4-bit weight in its ``Params4bit`` (a Parameter subclass) with the
quantisation state (absmax per block, code, shape) in a ``quant_state`` attribute that
sharding loses, as it loses Int8Params' ``CB`` / ``SCB`` (int8.py). ``Linear4bit`` holds
the same data as two ordinary parameters, both with one row per output feature::

    weight  uint8  [out, in / 2]          the packed 4-bit codes (two per byte), bnb's layout
    absmax  int32  [out, in / blocksize]  each block's absmax (float32) stored as raw bits

bnb quantises the row-major flattened weight in blocks of ``blocksize`` consecutive
elements; with ``in`` a multiple of the block size every block lies inside one row, so
quantising a rank's own rows gives bitwise the same codes and absmax as quantising the
whole weight, and row-sharding both tensors keeps each block's scale with its codes. The
absmax is stored as int32 bits for the reason the 8-bit scales are: FSDP2's mixed precision
and DeepSpeed's bf16 mode cast floating parameters.

The compute is bnb's own: ``bnb.matmul_4bit`` with a ``QuantState`` over the (gathered)
tensors, what bnb's ``Linear4bit`` calls, and its quantisation ``quantize_4bit``; the
backward is the input gradient only, through ``dequantize_4bit`` (a frozen base needs no
weight gradient, and bnb's autograd keeps the weight in ``ctx`` where activation
checkpointing cannot drop it).

Double quantisation (``bnb_4bit_use_double_quant``, QLoRA's): bnb quantises the float32
absmax once more, minus their mean over the whole tensor, in blocks of 256 that cross
rows. Then ``absmax`` holds those uint8 codes (still one per block, row-sharded with the
weight) and the second-level state, 4 bytes per 256 blocks plus the mean, is two small
buffers every rank keeps whole (``nested_absmax``, ``nested_offset``, float32 bits). A rank
cannot compute them from its rows, so the loader gathers the first-level absmax of every
row (float32, 1/16 of the packed codes) from all ranks first (sharded_loading.py).

A folder saved by transformers in 4-bit is read as it is: its flat codes and absmax are
row-major, so a rank's rows are a contiguous slice of each.
"""

from __future__ import annotations

import torch
from torch import nn

from wlora_dist.errors import UserError
from wlora_dist.model.bnb import require_bitsandbytes


def _bnb():
    return require_bitsandbytes("nf4 / fp4")


def quantize_rows_4bit(rows: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's 4-bit quantisation of ``rows`` [r, in] -> (packed uint8 [r, in/2], absmax float32
    [r, in/blocksize]). Blocks never cross rows (in % blocksize == 0): any rows quantise as
    they would inside the whole weight."""
    bnb = _bnb()
    packed, state = bnb.functional.quantize_4bit(
        rows.contiguous(), blocksize=blocksize, compress_statistics=False, quant_type=quant_type
    )
    return packed.view(rows.shape[0], -1), state.absmax.float().view(rows.shape[0], -1)


def absmax_bits(absmax: torch.Tensor) -> torch.Tensor:
    return absmax.float().contiguous().view(torch.int32)


NESTED_BLOCKSIZE = 256  # bnb's block size for the second quantisation of the absmax


def nested_blocks(out_features: int, in_features: int, blocksize: int) -> int:
    return -(-(out_features * in_features // blocksize) // NESTED_BLOCKSIZE)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bnb's second quantisation of a whole weight's float32 absmax [out, in/blocksize]
    (``quantize_4bit(..., compress_statistics=True)``, the same operations on the same
    flat tensor, so bitwise its numbers): (uint8 codes [out, in/blocksize], nested absmax
    float32 [ceil(blocks / 256)], offset float32 [1])."""
    functional = _bnb().functional
    flat = absmax.float().reshape(-1)
    offset = flat.mean()
    codes, state2 = functional.quantize_blockwise(flat - offset, blocksize=NESTED_BLOCKSIZE)
    return codes.view(absmax.shape), state2.absmax.float(), offset.reshape(1)


_DYNAMIC: dict[torch.device, torch.Tensor] = {}


def _dynamic_map(device: torch.device) -> torch.Tensor:
    """bnb's code for the nested absmax (what ``quantize_blockwise`` uses by default)."""
    if device not in _DYNAMIC:
        _DYNAMIC[device] = _bnb().functional.create_dynamic_map().to(device)
    return _DYNAMIC[device]


class Linear4bit(nn.Linear):
    """A frozen NF4 / FP4 linear whose storage is two plain parameters (see the module doc).
    A subclass of nn.Linear, so peft wraps it with its ordinary lora.Linear."""

    PACKED = ("weight", "absmax")  # what the checkpoint reader quantises from the float rows

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
        double_quant: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize = quant_type, blocksize
        self.compute_dtype, self.double_quant = compute_dtype, double_quant
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        absmax_dtype = torch.uint8 if double_quant else torch.int32
        self.absmax = nn.Parameter(
            torch.empty(out_features, in_features // blocksize, dtype=absmax_dtype, device=device), requires_grad=False
        )
        if double_quant:  # replicated: 4 bytes per 256 blocks (a 70B model's are 17 MB in all)
            nested = nested_blocks(out_features, in_features, blocksize)
            self.register_buffer("nested_absmax", torch.empty(nested, dtype=torch.int32, device=device))
            self.register_buffer("nested_offset", torch.empty(1, dtype=torch.int32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        pass  # loaded from a checkpoint, never initialised

    def quantize(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """This layer's first-level tensors for float weight ``rows`` (a rank's own, or all):
        packed codes and the float32 absmax as int32 bits (under double quantisation the
        loader quantises the whole layer's absmax once more, ``double_quantize``)."""
        packed, absmax = quantize_rows_4bit(rows, self.quant_type, self.blocksize)
        return {"weight": packed, "absmax": absmax_bits(absmax)}

    @torch.no_grad()
    def set_nested(self, nested_absmax: torch.Tensor, offset: torch.Tensor) -> None:
        self.nested_absmax.copy_(nested_absmax.float().reshape(-1).view(torch.int32))
        self.nested_offset.copy_(offset.float().reshape(1).view(torch.int32))

    def quant_state(self, weight: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype):
        """bnb's QuantState over (gathered) ``weight`` / ``absmax``."""
        functional = _bnb().functional
        nested = {}
        if self.double_quant:
            nested = {
                "offset": self.nested_offset.view(torch.float32).reshape(()),
                "state2": functional.QuantState(
                    absmax=self.nested_absmax.view(torch.float32),
                    code=_dynamic_map(weight.device),
                    blocksize=NESTED_BLOCKSIZE,
                    dtype=torch.float32,
                ),
            }
        return functional.QuantState(
            absmax=absmax.reshape(-1) if self.double_quant else absmax.view(torch.float32).reshape(-1),
            shape=torch.Size([self.out_features, self.in_features]),
            code=functional.get_4bit_type(self.quant_type, device=weight.device),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype,
            **nested,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        dtype = self.compute_dtype or in_dtype
        x = x.to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        if not torch.is_grad_enabled() or not x.requires_grad:
            state = self.quant_state(self.weight, self.absmax, dtype)
            out = _bnb().matmul_4bit(x, self.weight.view(-1, 1).t(), quant_state=state, bias=bias)
        else:
            out = _Frozen4bitMatMul.apply(x, self.weight, self.absmax, bias, self)
        return out.to(in_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        functional = _bnb().functional
        state = self.quant_state(self.weight, self.absmax, dtype)
        return functional.dequantize_4bit(self.weight.reshape(-1, 1), state).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}" + (", double_quant" if self.double_quant else "")
        )


class _Frozen4bitMatMul(torch.autograd.Function):
    """bnb's 4-bit forward; a backward that needs only the packed weight and absmax (saved
    as the parameters themselves: FSDP2 / ZeRO-3 re-gather them for backward)."""

    @staticmethod
    def forward(ctx, x, weight, absmax, bias, layer: Linear4bit):  # type: ignore[override]
        state = layer.quant_state(weight, absmax, x.dtype)
        out = _bnb().matmul_4bit(x, weight.view(-1, 1).t(), quant_state=state, bias=bias)
        ctx.save_for_backward(weight, absmax)
        ctx.layer, ctx.x_dtype, ctx.x_shape = layer, x.dtype, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        weight, absmax = ctx.saved_tensors
        functional = _bnb().functional
        state = ctx.layer.quant_state(weight, absmax, ctx.x_dtype)
        w = functional.dequantize_4bit(weight.reshape(-1, 1), state).to(ctx.x_dtype)
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.x_dtype)
        return torch.matmul(grad, w).view(ctx.x_shape), None, None, None, None


def to_4bit_linears(
    model: nn.Module,
    skip: list[str],
    quant_type: str,
    blocksize: int,
    compute_dtype: torch.dtype | None,
    double_quant: bool = False,
) -> list[str]:
    """Replace every nn.Linear whose last name is not in ``skip`` by an (empty) Linear4bit on
    the same device; returns the replaced names. Run on a meta model (or inside
    deepspeed.zero.Init) before any weight is loaded."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in skip:
            continue
        if module.in_features % blocksize:
            raise UserError(
                f"model.quantization={quant_type}: {name} has {module.in_features} input features, not a multiple of "
                f"model.bnb_4bit_blocksize={blocksize}; choose a block size that divides it (64 divides every "
                "supported model's hidden and intermediate sizes), or add the module to model.int8_skip_modules"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            double_quant=double_quant,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        setattr(parent, child, new)
        replaced.append(name)
    if not replaced:
        raise UserError(
            f"model.quantization={quant_type}: no linear layer to quantise (model.int8_skip_modules={skip})"
        )
    return replaced
