"""``wlora-dist config``: every config field, or --check files for what train would refuse."""

from __future__ import annotations

import argparse
import os
import sys

from wlora_dist.config import describe
from wlora_dist.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "config",
        help="list every config field, or --check YAML files",
        description="Without files: every config field, its type, default and meaning. With --check FILE...: "
        "every problem of each file in one pass, as `train` would find them before loading anything.",
    )
    c.add_argument(
        "files",
        nargs="*",
        help="config files to check (--check; flags may come before or after), and key.sub=value overrides "
        "applied to each, as train applies them",
    )
    c.add_argument(
        "--check",
        action="store_true",
        help="find what `train` would refuse in its first minute, without training: fields and values, the "
        "model's config.json and weights files (built on meta, adapters attached: K against n), every row of "
        "every data file through the format, template and tokenizer (the tokenised copy is kept: train starts "
        "from it), the micro-batches at --world-size ranks, the output folder; every problem at once",
    )
    c.add_argument(
        "--world-size",
        type=int,
        default=0,
        help="ranks the run will have (default: $WORLD_SIZE, else 1): the batches are checked for that many",
    )
    c.add_argument(
        "--syntax-only", action="store_true", help="with --check: fields and values only (no model or data access)"
    )


def run(args: argparse.Namespace) -> int:
    # key=value items are overrides, applied to every file (as train applies them).
    files = [f for f in args.files if "=" not in f or os.path.isfile(f)]
    overrides = [f for f in args.files if f not in files]
    if not (args.check or files):
        print("\n".join(describe()))
        return 0
    if not files:
        raise UserError("wlora-dist config --check FILE [FILE ...] [key=value ...]: give the config files to check")
    from wlora_dist.config.loading import check_config_file
    from wlora_dist.distributed.launchers import accelerate_overrides

    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    failed = False
    for path in files:
        cfg, problems = check_config_file(path, overrides, accelerate_overrides(os.environ))
        found = data = None
        if cfg is not None and not args.syntax_only:
            found, data, more = _check_run(cfg, world)
            problems += [p for p in more if p not in problems]
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        elif args.syntax_only:
            print(f"{path}: ok (fields and values; model, data and output not checked)")
        else:
            assert found is not None
            print(
                f"{path}: ok ({found.architecture}, n={found.n_adapters} adapters; {data}). Not checked: the "
                "accelerators' free memory (wlora-dist plan --config estimates it) and hub models or data not "
                "cached here"
            )
    return 2 if failed else 0


def _check_run(cfg: object, world: int) -> tuple[object, str | None, list[str]]:
    """What train refuses in its first minute, found without training: the preflight's
    checks, then every data row and the batches at ``world`` ranks. (found, data summary,
    problems)."""
    from wlora_dist.model.loading import load_tokenizer
    from wlora_dist.resolved import resolve_run
    from wlora_dist.training.preflight import check_all_data, preflight_problems, problems_of

    try:
        run = resolve_run(cfg)  # type: ignore[arg-type]
        found, problems, _ = preflight_problems(run)
    except UserError as e:  # the backend or the checkpoint to resume from
        return None, None, problems_of(e)
    if problems:
        return found, None, problems
    try:
        return found, check_all_data(run, load_tokenizer(run.cfg.model), world), []
    except UserError as e:
        return found, None, problems_of(e)
