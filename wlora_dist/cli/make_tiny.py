"""``wlora-dist make-tiny``: the embedded default, a tiny Llama and a small dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("make-tiny", help="write the embedded default: a tiny Llama and a small dataset")
    t.add_argument("--out", default="runs/tiny", help="folder for model/ and data/")
    t.add_argument("--rows", type=int, default=2000, help="training rows")
    t.add_argument("--hidden", type=int, default=64, help="hidden size")
    t.add_argument("--layers", type=int, default=4, help="decoder layers")


def run(args: argparse.Namespace) -> int:
    from wlora_dist.model.tiny import write_default

    out = write_default(Path(args.out), args.rows, args.hidden, args.layers)
    print(f"tiny Llama -> {out / 'model'} ; data -> {out / 'data'}")
    return 0
