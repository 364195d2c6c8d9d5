"""``wlora-dist export``: a checkpoint as a standard peft adapter (and the merged model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wlora_dist.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="write a peft adapter (and optionally merged weights) from a checkpoint",
        description="Export a checkpoint (any backend, any world size) as a standard peft adapter, gates "
        "folded into B as the trainer's own export does. One process, no GPU, no base model needed "
        "(except for --merged).",
    )
    e.add_argument("checkpoint", help="a step-NNNNNNNN folder, or a checkpoints/ folder (its newest)")
    e.add_argument("--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    e.add_argument("--merged", help="also write base + adapter merged, as a full HF model folder, here")
    e.add_argument("--model", help="base model folder for --merged (default: the one the run trained on)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output folders (once complete)")


def run(args: argparse.Namespace) -> int:
    from wlora_dist.checkpoint.folders import CheckpointError, list_checkpoints
    from wlora_dist.checkpoint.peft import export_checkpoint

    ckpt = Path(args.checkpoint)
    if not (ckpt / "meta.json").is_file():
        found = list_checkpoints(ckpt)  # a checkpoints/ folder: take its newest
        if not found:
            raise CheckpointError(f"{ckpt}: not a checkpoint (no meta.json) and holds no step-* checkpoint")
        ckpt = found[-1]
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists; choose another folder or pass --overwrite (replaced only when complete)")
    merged = Path(args.merged) if args.merged else None
    if merged is not None and merged.exists() and not args.overwrite:
        raise UserError(f"--merged {merged} exists; choose another folder or pass --overwrite")
    export_checkpoint(ckpt, out, merged, args.model or "")
    print(f"{ckpt} -> peft adapter {out}" + (f" ; merged model {merged}" if merged else ""))
    return 0
