"""``wlora-dist train`` (and train.py, which launchers start): check the run before anything
loads, then train on every rank the launcher started."""

from __future__ import annotations

import argparse
import os
import sys

from wlora_dist.config import describe, load_config
from wlora_dist.errors import SharedInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train WeightLoRA (selection -> prune -> LoRA on K -> export)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train WeightLoRA. Launch with torchrun, accelerate launch or deepspeed for several "
        "processes; plain python runs one.",
        epilog="config fields (set in YAML or as key.sub=value):\n" + "\n".join(describe()),
    )
    p.add_argument("--config", "-c", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    # The deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from wlora_dist.distributed.launchers import accelerate_overrides

    # Before any process group: fail fast. The accelerate config's choices come in first.
    cfg = load_config(args.config, args.overrides, accelerate_overrides(os.environ))
    # A path that is not there is said before torch is imported (seconds, not a minute).
    from wlora_dist.paths import local_model_problem, missing_data_file

    problem = local_model_problem(cfg.model.path) or missing_data_file(cfg.data.train, cfg.data.eval)
    if problem:
        raise SharedInputError(problem)
    _say(f"checking the run: model {cfg.model.path}, {len(cfg.data.train)} data source(s), {cfg.output.dir}")
    bars()
    # Imported here so `--help` and config errors answer in a fraction of a second.
    from wlora_dist.resolved import resolve_run
    from wlora_dist.training.preflight import preflight

    run = resolve_run(cfg)  # the backend, the folders, the checkpoint to resume: decided once
    found = preflight(run)  # model, adapters, data files, output: refused before anything loads
    _say(f"checked: {found.architecture}, n={found.n_adapters} adapters; backend {run.spec.name}; starting")
    from wlora_dist.distributed.env import init_distributed, shutdown
    from wlora_dist.training.tracking import setup_logging
    from wlora_dist.training.trainer import Trainer

    env = init_distributed(cfg.distributed.timeout_minutes)
    setup_logging(env.is_main)
    from wlora_dist.distributed.launchers import lone_process_warning

    lone = lone_process_warning(os.environ, env.device.type == "cuda")
    if lone and env.world_size == 1:
        import logging

        logging.getLogger("wlora_dist").warning(lone)
    trainer = Trainer(run, env, handle_signals=True)
    try:
        trainer.setup()
        result = trainer.train()
    finally:
        trainer.cleanup()
    if env.is_main:
        if result.stopped_at is not None:
            print(
                f"stopped by a signal at step {result.stopped_at}; checkpoint -> {result.checkpoint} "
                "(resume: checkpoint.resume_from=auto)"
            )
        else:
            print(f"kept {len(result.kept)} adapters; adapter -> {result.adapter_dir} ; report -> {result.report_dir}")
    shutdown()
    return 0


def bars() -> None:
    """Third-party progress bars at a terminal on rank 0 only: a log file gets no \r-joined
    bar lines, and the preflight reads rows on every rank (train's setup_logging decides
    again once it runs)."""
    from wlora_dist.training.tracking import third_party_bars

    third_party_bars(sys.stderr.isatty() and os.environ.get("RANK", "0") == "0")


def _say(message: str) -> None:
    """A line on rank 0 while train gets ready (before its logger exists), so a slow start
    on a loaded machine is not silence."""
    if os.environ.get("RANK", "0") == "0":
        import time

        print(f"{time.strftime('%H:%M:%S')} INFO {message}", file=sys.stderr, flush=True)
