"""model.*: the frozen base (where it comes from, its dtype, quantisation, checkpointing)."""

from __future__ import annotations

from typing import Annotated, Literal

from wlora_dist.config.fields import Float, Section, StrList, at_least, check, field

BNB_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class ModelConfig(Section):
    path: str = field("", "Base model: a local HF folder or a hub id (hub ids need internet).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", "Dtype of the frozen base weights; auto = bfloat16 on GPU, float32 on CPU."
    )
    trust_remote_code: bool = field(False, "Allow code from the model folder/hub to run. Off by default.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = field(
        "auto",
        "Attention kernel (transformers' attn_implementation): auto = transformers' choice for the family (sdpa "
        "where supported; Gemma 2 eager), sdpa (PyTorch's fused attention), eager, or flash_attention_2 (needs "
        "the flash-attn package and a GPU).",
    )

    @property
    def attention(self) -> str | None:
        """What to pass to transformers as attn_implementation (None: its own choice)."""
        return None if self.attn_implementation == "auto" else self.attn_implementation

    gradient_checkpointing: bool = field(False, "Recompute activations in backward (less memory, ~30% slower).")
    checkpoint_every_n_layers: Annotated[int, at_least(1)] = field(
        1,
        "With gradient_checkpointing: checkpoint decoder layers 0, N, 2N, ... only; the others keep their "
        "activations (transformers' every_n_layers). 1 = every layer.",
    )
    sharded_loading: bool = field(
        True, "fsdp2 / zero stage 3: never a full model per rank (meta init + own rows / partitioned init)."
    )
    quantization: Literal["none", "int8", "nf4", "fp4"] = field(
        "none",
        "Frozen base in 8-bit (bitsandbytes LLM.int8): int8 weights + per-row scales, quantised row by row as "
        "they load (or read as they are from a folder saved in bitsandbytes 8-bit); nf4 / fp4: bitsandbytes 4-bit "
        "(QLoRA's base), packed codes + per-block absmax, quantised row by row as they load (or read as they are "
        "from a folder saved in bitsandbytes 4-bit). All shardable by fsdp2 / zero 3.",
    )
    bnb_4bit_blocksize: Annotated[
        int, check(lambda v: v in BNB_4BIT_BLOCKSIZES, "must be a power of two from 32 to 4096 (bitsandbytes' choices)")
    ] = field(64, "nf4 / fp4: elements per quantisation block (bitsandbytes' blocksize).")
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        "auto", "nf4 / fp4: dtype of the 4-bit matmul's input and output; auto = the activations' dtype."
    )
    bnb_4bit_use_double_quant: bool = field(
        False,
        "nf4 / fp4: quantise the per-block absmax once more (bitsandbytes' double quantisation, QLoRA's): "
        "about 0.37 bits per parameter less at block size 64.",
    )
    int8_threshold: Annotated[Float, at_least(0)] = field(
        6.0, "LLM.int8 outlier threshold (transformers' llm_int8_threshold); 0 = no fp16 outlier columns."
    )
    int8_skip_modules: StrList = field(
        ["lm_head"],
        "Linear module names kept in model.dtype under int8 / nf4 / fp4 (transformers' llm_int8_skip_modules).",
    )
