"""selection.*: WeightLoRA's selection phase (the gates, their projection, the prune event,
WeightLoRA+ rounds) and the authors' preset."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from wlora_dist.config.fields import Float, Section, at_least, field, in_unit, to_float

# selection.preset: authors -> the authors' LLM pipeline (public code, branch weight_lora).
PRESETS: dict[str, dict[str, Any]] = {
    "authors": {
        "selection.project_every": 1,
        "selection.topk_by": "signed",
        "selection.lr_w": 5.0,
        "selection.schedule": "constant",
        "selection.reinit_kept": True,
        "selection.reset_optimizer": True,
        "selection.clip_gates": True,
        "adapter.include_lm_head": True,
        "optim.eps": 1e-6,
    }
}


K_DEFAULT = 0.25  # selection.k: a share of n (docs/method.md, "A real model": the K sweep)


def kept_count(k: int | float, n: int) -> int:
    """K for ``n`` adapters: an int k is K; a float is a share of n (rounded, at least 1)."""
    return k if isinstance(k, int) else min(n, max(1, round(k * n)))


def _kept_value(value: Any) -> Any:
    """selection.k: an int >= 1, or a float in (0, 1); a string is read as a float, as
    Float fields do (YAML reads 1e-1 as a string). One message, whatever is wrong."""
    value = to_float(value) if isinstance(value, str) else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{value!r} is neither a number of adapters (an int, e.g. 8) nor a share of them (a float in (0, 1), "
            "e.g. 0.25)"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{value} must be >= 1 (number of adapters kept; or a share of them in (0, 1), e.g. 0.25)")
    if isinstance(value, float) and not 0 < value < 1:
        raise ValueError(
            f"{value} as a float is a share of the n adapters and must be in (0, 1), e.g. 0.25; an int counts "
            f"them (write {int(value)} to keep {int(value)})"
            if value >= 1 and value.is_integer()
            else f"{value} as a float is a share of the n adapters and must be in (0, 1), e.g. 0.25"
        )
    return value


class SelectionConfig(Section):
    preset: Literal["none", "authors"] = field(
        "none",
        "authors: the authors' LLM pipeline in one setting (project every step, signed top-K, constant selection "
        "LR, fresh A/B and AdamW at the prune event, lm_head a candidate, gates clipped with the adapters, AdamW "
        "eps 1e-6). Fields you set yourself win over the preset.",
    )
    method: Literal["topk", "simplex", "none"] = field(
        "topk", "Projection of the gates: keep the K best (topk), onto the simplex, or none (plain LoRA)."
    )
    k: Annotated[int | float, BeforeValidator(_kept_value)] = field(
        K_DEFAULT,
        "Adapters kept by the top-K projection: an int counts them (1 <= k <= n); a float in (0, 1) is a share of "
        "the n adapters (K = round(k n), at least 1). Default 0.25: a quarter of n, what the K sweep on a real "
        "model supports (docs/method.md, 'A real model').",
    )
    topk_by: Literal["signed", "magnitude"] = field("signed", "Top-K by signed value (the authors' code) or by |w|.")
    lr_w: Annotated[Float, at_least(0)] = field(
        5.0,
        "SGD learning rate of the gates (times the same multiplier as optim.lr, see selection.schedule); authors: 5.0.",
    )
    steps: Annotated[int, at_least(0)] = field(
        10, "Selection phase length T in optimizer steps; the prune event follows step T."
    )
    steps_fraction: Annotated[Float, in_unit()] = field(
        0.0,
        "> 0: the selection phase is this fraction of the run's steps instead of selection.steps (rounded, at "
        "least 1; a multiple of selection.rounds); for runs sized by train.epochs.",
    )
    project_every: Annotated[int, at_least(0, "0 = once, at step T")] | None = field(
        None,
        "Project the gates every P optimizer steps during selection (and always at T); 0 = only at T; null "
        "(default) = two projections, every ceil(T/2) steps: the best mean of the schedules compared on "
        "planted-subset tasks of many shapes; on a small model fine-tuned on real text one projection at T did "
        "slightly better (docs/method.md, 'Defaults, by evidence'). The authors project every step (1).",
    )
    schedule: Literal["constant", "main"] = field(
        "constant",
        "LR during selection: constant (lr and lr_w at their peak, the authors' choice; the warmup/decay schedule "
        "then starts at the prune event) or main (one warmup/decay schedule over the whole run scales both).",
    )
    reinit_kept: bool = field(False, "Re-initialise the kept adapters (and their Adam state) at the prune event.")
    reset_optimizer: bool = field(False, "Fresh AdamW state for the kept adapters at the prune event (authors: yes).")
    clip_gates: bool = field(
        False,
        "Clip the gates' gradient together with the adapters' (one norm over both, optim.max_grad_norm), as the "
        "authors' trainer does; false clips the adapters alone. Not available with distributed.backend zero.",
    )
    fold_gates: bool = field(False, "At the prune event fold w into B (B <- w*B) and set kept gates to 1.")
    grad_eps: Float = field(1e-12, "Skip the projection while ||grad_w|| <= grad_eps (true at step 1).")
    rounds: Annotated[int, at_least(0)] = field(
        0,
        "WeightLoRA+ (the authors' FatLoRA): R > 0 halving rounds at steps T/R, 2T/R, ..., T; each round keeps "
        "the best half (K = n, n/2, ..., n/2^R; selection.k is not used), removes the rest and doubles the "
        "rank of every kept adapter, so the adapter parameter budget stays the same. 0 = plain WeightLoRA.",
    )
    extension: Literal["smart", "dummy", "restart"] = field(
        "smart",
        "WeightLoRA+ rank doubling: smart (QR, the product BA and the model output unchanged), dummy ([A; N], "
        "[B, 0], unchanged too) or restart (fresh A, zero B).",
    )

    def kept(self, n: int) -> int:
        """K on a model with ``n`` adapters."""
        return kept_count(self.k, n)

    def problems(self) -> list[str]:
        """What the fields get wrong together."""
        p = []
        if self.lr_w == 0 and self.method in ("topk", "simplex"):
            p.append(
                f"selection.lr_w: 0 with selection.method={self.method} never moves the gates (all stay tied, so "
                "the first K in name order would be kept); use a positive value (the authors' is 5.0), or method: none"
            )
        if self.rounds > 0 and self.method != "topk":
            p.append(f"selection.rounds: {self.rounds} (WeightLoRA+) needs selection.method=topk, not {self.method}")
        if self.rounds > 0 and not self.steps_fraction and (self.steps < self.rounds or self.steps % self.rounds):
            p.append(
                f"selection.rounds: {self.rounds} must divide selection.steps={self.steps} "
                "(rounds at steps T/R, 2T/R, ..., T)"
            )
        return p
