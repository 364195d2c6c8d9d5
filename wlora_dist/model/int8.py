"""The frozen base in 8-bit (bitsandbytes LLM.int8), in a form FSDP2 and ZeRO-3 can shard.

bitsandbytes keeps an 8-bit weight in its own ``Int8Params`` (a Parameter subclass with
``CB`` / ``SCB`` attributes). FSDP2 replaces every parameter by a plain DTensor and loses
them (docs/measurements.md: ``AttributeError: 'Parameter' object has no attribute 'CB'``); ZeRO-3
partitions ``.data`` and knows nothing of the attributes. ``Int8Linear`` holds the same two
tensors as ordinary parameters, both with their rows on dim 0::

    weight  int8  [out, in]  bnb's CB: round(127 * W / absmax(row))
    SCB     int32 [out]      bnb's SCB (the float32 row absmax) stored as its raw bits

so sharding both on dim 0 keeps every row's scale with its row, and all-gathering them
gives back exactly bnb's CB and SCB. The scales are stored as int32 bits because FSDP2's
MixedPrecisionPolicy and DeepSpeed's bf16 mode cast every *floating* parameter (to bf16:
a 0.4% error on every scale) and leave integer ones alone; ``SCB.view(float32)`` is free.

The compute is bnb's own: ``bnb.matmul`` with a ``MatmulLtState`` over the (gathered)
CB / SCB, the same call bnb's ``Linear8bitLt`` makes, so the numbers are bnb's (int8
matmul with fp16 outlier columns on GPU; dequantise + matmul on CPU). The quantisation is
bnb's too (``int8_vectorwise_quant`` of the fp16 weight, what ``load_in_8bit`` does):
quantising on load gives bitwise the CB / SCB transformers + bnb would.

Written here because no library offers it: bnb's layer cannot be sharded, and neither
FSDP2 nor DeepSpeed know a quantised frozen weight.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from wlora_dist.errors import UserError
from wlora_dist.model.bnb import require_bitsandbytes


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's row-wise int8 quantisation of ``rows`` [r, in] -> (CB int8 [r, in], SCB float32 [r]).
    Rows are independent, so quantising a rank's own rows equals quantising the whole."""
    bnb = require_bitsandbytes()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(rows.to(torch.float16))
    return cb, scb.float()


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W ~= CB * SCB / 127, computed as bnb computes it (its CPU matmul and its backward)."""
    return cb.to(dtype).mul_(scb.to(dtype).unsqueeze(1).mul(1.0 / 127.0))


def scb_bits(scb: torch.Tensor) -> torch.Tensor:
    return scb.float().contiguous().view(torch.int32)


class _WarnOnce(logging.Filter):
    """bnb logs "inputs will be cast ... to float16" on *every* int8 matmul; once is enough."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_bnb_filter = _WarnOnce()


class Int8Linear(nn.Linear):
    """A frozen LLM.int8 linear whose storage is two plain parameters (see the module doc).

    A subclass of nn.Linear (as bnb's Linear8bitLt is), so peft wraps it with its ordinary
    lora.Linear and every "is this a linear?" check holds.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        threshold: float = 6.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = threshold
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.SCB = nn.Parameter(torch.empty(out_features, dtype=torch.int32, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        pass  # loaded from a checkpoint, never initialised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = require_bitsandbytes()
        state = bnb.MatmulLtState()
        state.CB = self.weight  # under FSDP2 / ZeRO-3: the all-gathered (int8) weight
        state.SCB = self.SCB.view(torch.float32)
        state.has_fp16_weights = False
        state.threshold = self.threshold
        state.is_training = self.training
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if not torch.is_grad_enabled() or not x.requires_grad:
            return bnb.matmul(x, self.weight, bias=bias, state=state)
        return _FrozenInt8MatMul.apply(x, self.weight, self.SCB, bias, state)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.SCB.view(torch.float32), dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8, threshold={self.threshold}"
        )


class _FrozenInt8MatMul(torch.autograd.Function):
    """bitsandbytes' forward, and a backward that needs only the int8 weight and scales.

    bnb's MatMul8bitLt (GPU) / MatMul8bitFp (CPU) keep their input for a weight gradient a
    frozen base never needs, and keep it in ``ctx`` rather than through
    save_for_backward, so activation checkpointing cannot drop it either: every int8
    linear held its input until backward (measured by benchmarks.plan_check: +22% of the
    step's peak on the tiny Llama with checkpointing). The input gradient is bnb's own
    formula (MatMul8bitLt.backward), on the weight as gathered for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, bias, state) -> torch.Tensor:  # type: ignore[override]
        out = require_bitsandbytes().matmul(x, weight, bias=bias, state=state)  # grad mode is off in here
        ctx.save_for_backward(weight, scb)  # the parameters themselves (FSDP2 / ZeRO-3 re-gather them)
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        weight, scb = ctx.saved_tensors
        cb = weight.to(ctx.x_dtype, copy=True).mul_(scb.view(torch.float32).unsqueeze(1).mul(1.0 / 127.0))
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.matmul(grad.to(ctx.x_dtype), cb).view(ctx.x_shape)
        return grad_x, None, None, None, None


def to_int8_linears(model: nn.Module, skip: list[str], threshold: float) -> list[str]:
    """Replace every nn.Linear whose last name is not in ``skip`` by an (empty) Int8Linear
    on the same device; returns the replaced module names. Run on a meta model (or inside
    deepspeed.zero.Init) before any weight is loaded."""
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_bnb_filter)
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = Int8Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            threshold=threshold,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        setattr(parent, child, new)
        replaced.append(name)
    if not replaced:
        raise UserError(f"model.quantization=int8: no linear layer to quantise (model.int8_skip_modules={skip})")
    return replaced
