"""Model FLOPs of a LoRA training step, for model-FLOPs utilisation (MFU).

Counted per token, as nanoGPT and PaLM count a training step (the attention matrices
non-causal, 12 L T d_attn; recomputation by activation checkpointing not counted):

    frozen base matmuls  4 N_base   forward 2 N, backward 2 N (input gradients only)
    trained adapters     6 N_lora   forward 2 N, backward 4 N (input and weight gradients)
    attention            12 L T d_attn   (QK^T and AV, forward + 2x for backward)

N_base: the weights of every decoder linear and the output head (the embedding is a
lookup); N_lora: r (in + out) per adapter; T: the sequence length; d_attn: heads x
head_dim. MFU = FLOPs per token x tokens/s per GPU / the GPU's peak, where the peak is the
bf16 matmul rate measured in the same device call (benchmarks/gpu/smoke.py), not a
datasheet's. Pure arithmetic: no torch.
"""

from __future__ import annotations

from wlora_dist.planning.shapes import ModelShape


def base_matmul_params(shape: ModelShape) -> int:
    per_layer = sum(i * o for i, o in shape.linear_dims().values())
    return shape.layers * per_layer + shape.hidden * shape.vocab  # + the output head


def adapter_params(shape: ModelShape, lora_rank: int, kinds: list[str]) -> int:
    """A and B of one adapter on each linear named in ``kinds`` (one entry per adapter)."""
    dims = shape.linear_dims()
    return sum(lora_rank * (dims[k][0] + dims[k][1]) for k in kinds)


def flops_per_token(shape: ModelShape, seq_len: int, lora_rank: int, kinds: list[str]) -> float:
    """Training FLOPs per token of a LoRA step on ``shape`` with one adapter per entry of
    ``kinds`` (module kinds, repeated per layer)."""
    attention = 12 * shape.layers * seq_len * shape.heads * shape.d
    return 4 * base_matmul_params(shape) + 6 * adapter_params(shape, lora_rank, kinds) + attention


def mfu(flops_token: float, tokens_per_s_per_gpu: float, peak_flops: float | None) -> float | None:
    return flops_token * tokens_per_s_per_gpu / peak_flops if peak_flops else None
