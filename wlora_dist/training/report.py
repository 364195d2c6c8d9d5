"""The selection report: which adapters were kept (JSON) and a heatmap of w (PNG),
decoder layer x module type, with removed adapters crossed out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes
import matplotlib.pyplot as plt

from wlora_dist.config import FUSED_LINEARS, LLAMA_LINEARS
from wlora_dist.method.selector import LayoutEvent
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.training.tracking import RunLogger


def selection_summary(wl: WeightLoRA, optimizer_step: int, phase: str, extra: dict[str, Any]) -> dict:
    gates = wl.gates.detach().float().cpu().tolist()
    kept = wl.kept.tolist()
    return {
        "optimizer_step": optimizer_step,
        "phase": phase,
        "n_adapters": wl.n,
        "n_kept": int(sum(kept)),
        "kept": [s.name for s in wl.sites if kept[s.index]],
        "adapters": [
            {
                "index": s.index,
                "name": s.name,
                "layer": s.layer,
                "kind": s.kind,
                "gate": gates[s.index],
                "kept": kept[s.index],
            }
            for s in wl.sites
        ],
        **extra,
    }


def write_report(wl: WeightLoRA, out_dir: Path, optimizer_step: int, phase: str, extra: dict[str, Any]) -> Path:
    """Write selection-<phase>.json and gates-<phase>.png; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = selection_summary(wl, optimizer_step, phase, extra)
    path = out_dir / f"selection-{phase}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    plot_gates(summary, out_dir / f"gates-{phase}.png")
    return path


def plot_gates(summary: dict, path: Path) -> None:
    adapters = summary["adapters"]
    kinds = list(dict.fromkeys(a["kind"] for a in sorted(adapters, key=lambda a: _kind_order(a["kind"]))))
    layers: list[int | None] = sorted({a["layer"] for a in adapters if a["layer"] is not None})
    if any(a["layer"] is None for a in adapters) or not layers:
        layers.append(None)  # adapters outside the decoder layers (adapter.include_lm_head): a last row
    grid = [[float("nan")] * len(kinds) for _ in layers]
    removed = []
    for a in adapters:
        r, c = layers.index(a["layer"]), kinds.index(a["kind"])
        grid[r][c] = a["gate"]
        if not a["kept"]:
            removed.append((r, c))
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2, 0.35 * len(layers) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for r, c in removed:
        ax.text(c, r, "x", ha="center", va="center", color="red", fontsize=9)
    if len(layers) <= 16:  # the gate's value in its cell while the cells are big enough to read
        for a in adapters:
            r, c = layers.index(a["layer"]), kinds.index(a["kind"])
            if a["kept"]:
                ax.text(c, r, f"{a['gate']:.2g}", ha="center", va="center", color="white", fontsize=7)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) if x is not None else "head" for x in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("decoder layer")
    ax.set_title(
        f"WeightLoRA gates w, step {summary['optimizer_step']} ({summary['phase']}): "
        f"{summary['n_kept']}/{summary['n_adapters']} kept (x = removed)",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, label="w")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_KIND_ORDER = [*LLAMA_LINEARS, *FUSED_LINEARS]


def _kind_order(kind: str) -> tuple[int, str]:
    return (_KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER), kind)


def round_record(event: LayoutEvent) -> dict[str, Any]:
    """A WeightLoRA+ round as the report and the checkpoint keep it."""
    before, after = event.probe_losses or (None, None)
    return {
        "round": event.change.round_,
        "step": event.change.step,
        "k": len(event.kept),
        "rank": event.rank,
        "kept": event.kept,
        "seconds": event.seconds,
        "layout_seconds": event.layout_seconds,
        "probe_loss_before": before,
        "probe_loss_after": after,
    }


def report_layout_change(
    event: LayoutEvent, wl: WeightLoRA, out_dir: Path | None, rounds: list[dict[str, Any]], logger: RunLogger
) -> None:
    """The selection report of a prune event / WeightLoRA+ round (rank 0 passes ``out_dir``)
    and its log line."""
    change, (before, after) = event.change, event.probe_losses or (float("nan"), float("nan"))
    prune = change.kind == "prune"
    extra: dict[str, Any] = {"rounds": rounds}
    if prune:
        extra.update(
            prune_seconds=event.seconds,
            prune_layout_seconds=event.layout_seconds,
            probe_loss_before=before,
            probe_loss_after=after,
        )
    if out_dir is not None:
        write_report(wl, out_dir, change.step, "prune" if prune else f"round{change.round_}", extra)
    kept_names = set(event.kept)
    logger.info(
        "%s at step %d: kept %d of %d adapters at rank %d, removed %d, %.3f s (probe loss %.5f -> %.5f); kept: %s",
        "prune event" if prune else f"WeightLoRA+ round {change.round_}",
        change.step,
        len(event.kept),
        wl.n,
        event.rank,
        len(change.drop),
        event.seconds,
        before,
        after,
        compact_sites([s for s in wl.sites if s.name in kept_names]),
    )


def compact_sites(sites: list) -> str:
    """'L0 q,o,down | L3 up | lm_head': adapters grouped by decoder layer, short module names."""
    by_layer: dict[int | None, list[str]] = {}
    for s in sorted(sites, key=lambda s: (s.layer is None, s.layer or 0, _kind_order(s.kind))):
        by_layer.setdefault(s.layer, []).append(s.kind.removesuffix("_proj"))
    parts = [f"L{layer} {','.join(kinds)}" for layer, kinds in by_layer.items() if layer is not None]
    parts += by_layer.get(None, [])
    return " | ".join(parts) if parts else "none"
