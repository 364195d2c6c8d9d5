"""Command line: ``wlora-dist train|export|generate|plan|preview|make-tiny|report|config``
(train.py wraps ``train``), one module per subcommand, each with ``add_parser`` and ``run``.

wlora-dist train --config configs/tiny_cpu.yaml train.max_steps=50 selection.k=6
wlora-dist export runs/tiny_cpu/checkpoints/step-00000100 --out runs/tiny_cpu/adapter-100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from wlora_dist.cli import config, export, generate, make_tiny, plan, preview, report, train
from wlora_dist.errors import UserError

COMMANDS = {  # subcommand -> its module, in --help's order
    "train": train,
    "export": export,
    "generate": generate,
    "make-tiny": make_tiny,
    "report": report,
    "plan": plan,
    "preview": preview,
    "config": config,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wlora-dist", description="WeightLoRA fine-tuning, distributed.")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from wlora_dist.noise import silence_known_noise

    silence_known_noise()  # before anything imports DeepSpeed or bitsandbytes
    args = build_parser().parse_args(argv)
    if args.command in ("config", "make-tiny", "export", "generate", "preview"):  # train: after its path checks
        train.bars()
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        report_error("interrupted (Ctrl-C twice, or before training started): no checkpoint written")
        return 130
    except BrokenPipeError:  # `wlora-dist plan ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own recipe: no flush error at exit
        return 141
    except OSError as e:  # the operating system said no: a path, permissions, a full disk
        where = f" ({e.filename})" if e.filename else ""
        report_error(
            f"{e.strerror or e}{where}; check that the folder exists, is writable and has free space "
            "(output.dir, checkpoint.dir, model.path)"
        )
        return 1
    except UserError as e:
        report_error(str(e), same_on_every_rank=e.same_on_every_rank)
        return e.exit_code


def report_error(message: str, same_on_every_rank: bool = False) -> None:
    """One error, said once. Under torchrun (and accelerate launch, which runs it) every
    rank writes it to the launcher's error file (TORCHELASTIC_ERROR_FILE): the launcher's
    failure summary, the last thing printed, then shows the message where it would say
    "To enable traceback see ...". Rank 0 prints it first; another rank prints it only
    where no launcher will show it (and not a config error, which every rank has)."""
    rank = os.environ.get("RANK", "0")
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import time

        try:
            # torchelastic's own format (ErrorHandler.record_exception), the message in place
            # of the Python call stack its summary prints.
            info = {"py_callstack": message, "timestamp": str(int(time.time()))}
            Path(error_file).write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
        except OSError:
            error_file = None  # a full disk: say it on stderr instead
    if rank == "0" or not (error_file or same_on_every_rank):
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {message}", file=sys.stderr, flush=True)
    elif same_on_every_rank:
        # Rank 0 found it too: let it say it and be the launcher's first failure, rather
        # than this rank's exit having the launcher stop rank 0 before it prints.
        import time

        time.sleep(2.0)
