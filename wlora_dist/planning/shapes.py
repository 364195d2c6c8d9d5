"""The shape of a decoder model, as the planner counts it: pure data, no file or library access
(planning/sources.py makes one from a config.json, a model folder or a preset)."""

from __future__ import annotations

from dataclasses import dataclass

from wlora_dist.config import FUSED_LINEARS, LLAMA_LINEARS

LINEARS = LLAMA_LINEARS  # the module kinds of a Llama decoder layer
ALL_KINDS = (*LLAMA_LINEARS, *FUSED_LINEARS)  # every linear name of the supported families

# model_type of the families whose attention and MLP input projections are fused
# (Phi-3: qkv_proj, gate_up_proj); every other supported family has Llama's seven linears.
FUSED_FAMILIES = ("phi3",)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0 = hidden // heads
    tied: bool = False
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj instead of q/k/v and gate/up

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kinds(self) -> tuple[str, ...]:
        """The linear module names of one decoder layer, in layer order."""
        return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") if self.fused else LINEARS

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer."""
        h, f, q, kv = self.hidden, self.intermediate, self.heads * self.d, self.kv_heads * self.d
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * f), "down_proj": (f, h)}
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }
