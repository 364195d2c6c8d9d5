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


_WHY = {
    "HSDP": "the base fits a node: its all-gathers stay inside the node, only gradients cross nodes",
    "FSDP2": "the base needs every rank's share: each step all-gathers it across nodes",
}


def _gb(nbytes: float) -> str:
    """Bytes moved, in decimal units as network bandwidths are quoted."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e7 or nbytes == 0 else f"{nbytes / 1e6:.2f} MB"


def format_node_layouts(layouts: list[tuple[str, Plan]], best: str | None, nodes: int, gpus_per_node: int) -> str:
    """`plan --nodes N --gpus-per-node G`: each sharded layout's bytes per rank, held and
    moved by collectives in one optimizer step (planning/traffic.py)."""
    from wlora_dist.planning.traffic import plan_traffic

    first = layouts[0][1]
    ws = first.inp.world_size
    out = [
        f"{nodes} node(s) x {gpus_per_node} GPUs ({ws} ranks), {first.inp.base} base, budget "
        f"{first.budget / GiB:.1f} GiB per GPU; per rank, selection -> after the prune event:"
    ]
    for name, p in layouts:
        mark = "fits" if p.fits_before and p.fits_after else "does not fit"
        t = plan_traffic(p.inp, gpus_per_node)
        out.append(
            f"  {name:<11} base {p.before.base / GiB:6.2f} GiB, peak {p.before.total / GiB:6.2f} -> "
            f"{p.after.total / GiB:6.2f} GiB  {mark}  ({p.inp.backend.describe(ws)})"
        )
        out.append(
            f"  {'':<11} moves per step: {_gb(t.before.inside_total)} -> {_gb(t.after.inside_total)} inside a node, "
            f"{_gb(t.before.across_total)} -> {_gb(t.after.across_total)} across nodes"
        )
    if best is None:
        out.append("nothing fits: more nodes, a quantised base (--base int8 / nf4) or activation checkpointing")
    else:
        out.append(f"use {best}" + (f": {_WHY[best]}" if best in _WHY else ""))
    return "\n".join(out)


def node_layouts_json(layouts: list[tuple[str, Plan]], best: str | None, nodes: int, gpus_per_node: int) -> str:
    import json

    from wlora_dist.planning.traffic import plan_traffic

    rows = []
    for name, p in layouts:
        t = plan_traffic(p.inp, gpus_per_node)
        rows.append(
            {
                "layout": name,
                "backend": p.inp.backend.describe(p.inp.world_size),
                "base": p.before.base,
                "before": p.before.total,
                "after": p.after.total,
                "fits": p.fits_before and p.fits_after,
                "traffic_bytes_per_step": {
                    "before": {"inside": t.before.inside, "across": t.before.across},
                    "after": {"inside": t.after.inside, "across": t.after.across},
                },
            }
        )
    return json.dumps({"nodes": nodes, "gpus_per_node": gpus_per_node, "layouts": rows, "use": best}, indent=2)
