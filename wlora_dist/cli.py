"""Command line: ``wlora-dist train|export|generate|plan|make-tiny|report|config`` (train.py wraps ``train``).

wlora-dist train --config configs/tiny_cpu.yaml train.max_steps=50 selection.k=6
wlora-dist export runs/tiny_cpu/checkpoints/step-00000100 --out runs/tiny_cpu/adapter-100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from wlora_dist.config import describe, load_config
from wlora_dist.errors import SharedInputError, UserError
from wlora_dist.plan_cli import add_plan_parser, cmd_plan


def _train_parser(sub: argparse._SubParsersAction) -> None:
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


def cmd_train(args: argparse.Namespace) -> int:
    from wlora_dist.distributed.launchers import accelerate_overrides

    # Before any process group: fail fast. The accelerate config's choices come in first.
    cfg = load_config(args.config, args.overrides, accelerate_overrides(os.environ))
    # A path that is not there is said before torch is imported (seconds, not a minute).
    from wlora_dist.paths import local_model_problem, missing_data_file

    problem = local_model_problem(cfg.model.path) or missing_data_file(cfg.data.train, cfg.data.eval)
    if problem:
        raise SharedInputError(problem)
    _say(f"checking the run: model {cfg.model.path}, {len(cfg.data.train)} data source(s), {cfg.output.dir}")
    _bars()
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


def _bars() -> None:
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


def cmd_export(args: argparse.Namespace) -> int:
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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from wlora_dist.generate import GenerateOptions, generate, load_for_generation, read_prompts

    prompts = read_prompts(args.prompt or [], args.prompts_file)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_generation(args.model, args.base, device)
    opts = GenerateOptions(args.max_new_tokens, args.temperature, args.top_p, not args.no_chat_template, args.seed)
    for prompt, completion in zip(prompts, generate(model, tokenizer, prompts, opts), strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}))
        else:
            print(f"### prompt\n{prompt}\n### completion\n{completion}\n")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from wlora_dist.model.tiny import write_default

    out = write_default(Path(args.out), args.rows, args.hidden, args.layers)
    print(f"tiny Llama -> {out / 'model'} ; data -> {out / 'data'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from wlora_dist.training.report import plot_gates

    summary = json.loads(Path(args.selection_json).read_text())
    out = Path(args.out or Path(args.selection_json).with_suffix(".png"))
    plot_gates(summary, out)
    print(f"{summary['n_kept']}/{summary['n_adapters']} kept at step {summary['optimizer_step']}; heatmap -> {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
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


def _cmd_preview(args: argparse.Namespace) -> int:
    from wlora_dist.data.preview import cmd_preview

    return cmd_preview(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wlora-dist", description="WeightLoRA fine-tuning, distributed.")
    sub = ap.add_subparsers(dest="command", required=True)
    _train_parser(sub)
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
    g = sub.add_parser(
        "generate",
        help="generate from an adapter (or a merged model) to see what the fine-tune does",
        description="Load a peft adapter folder onto its base (or a full model folder) and complete prompts, "
        "through the tokenizer's chat template when it has one. Greedy unless --temperature > 0.",
    )
    g.add_argument("model", help="an adapter folder (runs/<name>/adapter) or a model folder (export --merged)")
    g.add_argument("--base", help="base model for an adapter (default: base_model_name_or_path in its config)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help='one prompt per line (.txt) or {"prompt": ...} rows (.jsonl)')
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    t = sub.add_parser("make-tiny", help="write the embedded default: a tiny Llama and a small dataset")
    t.add_argument("--out", default="runs/tiny", help="folder for model/ and data/")
    t.add_argument("--rows", type=int, default=2000, help="training rows")
    t.add_argument("--hidden", type=int, default=64, help="hidden size")
    t.add_argument("--layers", type=int, default=4, help="decoder layers")
    r = sub.add_parser("report", help="redraw the gate heatmap from a selection-*.json")
    r.add_argument("selection_json")
    r.add_argument("--out", help="PNG path (default: next to the JSON)")
    add_plan_parser(sub)
    from wlora_dist.data.preview import add_preview_parser

    add_preview_parser(sub)
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
    return ap


def main(argv: list[str] | None = None) -> int:
    from wlora_dist.noise import silence_known_noise

    silence_known_noise()  # before anything imports DeepSpeed or bitsandbytes
    args = build_parser().parse_args(argv)
    handlers = {
        "train": cmd_train,
        "export": cmd_export,
        "make-tiny": cmd_make_tiny,
        "generate": cmd_generate,
        "report": cmd_report,
        "config": cmd_config,
        "plan": cmd_plan,
        "preview": _cmd_preview,
    }
    if args.command in ("config", "make-tiny", "export", "generate", "preview"):  # train: after its path checks
        _bars()
    try:
        return handlers[args.command](args)
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


if __name__ == "__main__":
    sys.exit(main())
