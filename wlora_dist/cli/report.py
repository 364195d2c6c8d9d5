"""``wlora-dist report``: redraw a selection report's gate heatmap."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="redraw the gate heatmap from a selection-*.json")
    r.add_argument("selection_json")
    r.add_argument("--out", help="PNG path (default: next to the JSON)")


def run(args: argparse.Namespace) -> int:
    from wlora_dist.training.report import plot_gates

    summary = json.loads(Path(args.selection_json).read_text())
    out = Path(args.out or Path(args.selection_json).with_suffix(".png"))
    plot_gates(summary, out)
    print(f"{summary['n_kept']}/{summary['n_adapters']} kept at step {summary['optimizer_step']}; heatmap -> {out}")
    return 0
