"""adapter.*: the LoRA adapters put on the base's linears (one gate each)."""

from __future__ import annotations

from typing import Annotated

from wlora_dist.config.fields import (
    FUSED_LINEARS,
    LLAMA_LINEARS,
    Float,
    IntList,
    Section,
    StrList,
    at_least,
    check,
    field,
    in_unit,
)


class AdapterConfig(Section):
    lora_rank: Annotated[int, at_least(1)] = field(8, "LoRA rank r of every adapter.")
    lora_alpha: Float = field(32.0, "LoRA alpha; the adapter output is scaled by alpha / r.")
    lora_dropout: Annotated[Float, in_unit()] = field(0.0, "Dropout on the adapter input (peft's lora_dropout).")
    use_rslora: bool = field(
        False, "rsLoRA: scale the adapter output by alpha / sqrt(r) instead of alpha / r (peft's use_rslora)."
    )
    target_modules: Annotated[StrList, check(bool, "is empty; name at least one linear, e.g. [q_proj, v_proj]")] = (
        field(
            [*LLAMA_LINEARS, *FUSED_LINEARS],
            "Linear module names that get an adapter, matched as peft matches them: a name (q_proj) targets every "
            "linear of that name, a dotted path (layers.3.mlp.down_proj) the one linear whose name ends with it. "
            "The default covers Llama, Qwen2/3, Mistral, Gemma 1/2/3 and Phi-3's fused qkv_proj / gate_up_proj.",
        )
    )
    layers: Annotated[IntList, check(lambda v: all(i >= 0 for i in v), "has a negative index")] | None = field(
        None, "Decoder layer indices that get adapters; null = all layers."
    )
    include_lm_head: bool = field(
        False, "Also put an adapter (and a gate) on lm_head, as the authors' LLM pipeline does (n = 7L + 1)."
    )
