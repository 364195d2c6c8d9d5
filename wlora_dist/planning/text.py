"""The plan as text: what `wlora-dist plan` prints and the run logs."""

from __future__ import annotations

from wlora_dist.planning.memory_plan import GiB, Plan
from wlora_dist.planning.search import describe_settings


def human(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def format_plan(p: Plan) -> str:
    inp = p.inp
    rows = [
        ("base weights", "base"),
        ("adapters (+ fp32 masters)", "adapters"),
        ("gradients", "grads"),
        ("optimizer state", "optimizer"),
        ("activations", "activations"),
        ("logits / loss", "loss"),
        ("gathered units, ZeRO buckets", "buffers"),
    ]
    b, a = p.before, p.after
    out = [
        f"{describe_settings(inp)}; world size {inp.world_size}; LoRA r={inp.lora_rank}; "
        f"sequence {inp.seq_len}; n={b.n_adapters} -> K={a.n_adapters}",
        f"{'per rank, GiB':34s}{'selection (n)':>15s}{'after prune (K)':>17s}",
    ]
    for label, key in rows:
        out.append(f"{label:34s}{getattr(b, key) / GiB:15.2f}{getattr(a, key) / GiB:17.2f}")
    out.append(f"{'total':34s}{b.total / GiB:15.2f}{a.total / GiB:17.2f}")
    budget = p.budget / GiB
    out.append(
        f"budget {budget:.1f} GiB ({inp.gpu_gib:g} GiB minus {inp.reserve_gib:g} reserved): "
        f"selection {'fits' if p.fits_before else 'does NOT fit'}, after prune "
        f"{'fits' if p.fits_after else 'does NOT fit'}"
    )
    return "\n".join(out)
