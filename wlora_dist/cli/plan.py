"""``wlora-dist plan``: per-rank memory of a run before and after the prune event, what
would fit, and (``--nodes``) the sharded layouts of a multi-node job side by side."""

from __future__ import annotations

import argparse
import json

from wlora_dist.config import load_config
from wlora_dist.errors import UserError


def _count_or_share(text: str) -> int | float:
    """--k: an int counts adapters, a float in (0, 1) is a share of n (selection.k's rule)."""
    value: int | float = int(text) if text.strip().isdigit() else float(text)
    if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value < 1):
        raise argparse.ArgumentTypeError(f"{text}: a count >= 1 (e.g. 32) or a share of n in (0, 1) (e.g. 0.25)")
    return value


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from wlora_dist.distributed.spec import BackendSpec
    from wlora_dist.planning.memory_plan import PlanInput, activation_bytes, host_bytes_per_rank, plan, sites
    from wlora_dist.planning.search import recommend
    from wlora_dist.planning.shapes import ALL_KINDS
    from wlora_dist.planning.sources import run_plan_input, shape_from
    from wlora_dist.planning.text import format_plan

    kw: dict = {}
    model = args.model
    notes: list[str] = []
    launch = _accelerate_launch(args.accelerate_config) if args.accelerate_config else {}
    if args.world_size is None:
        args.world_size = launch.get("num_processes", 1)
        if "num_processes" in launch:
            notes.append(f"world size {args.world_size}: num_processes of {args.accelerate_config}")
    on_gpu = not (args.cpu or launch.get("use_cpu"))
    if args.config:  # the run config's choices first (with the launcher's); flags given explicitly win
        from wlora_dist.distributed.launchers import accelerate_config_env, accelerate_overrides

        launcher = accelerate_overrides(accelerate_config_env(args.accelerate_config)) if args.accelerate_config else []
        cfg = load_config(args.config, args.overrides, launcher)
        model = model or cfg.model.path
        from wlora_dist.resolved import resolve_run

        run = resolve_run(cfg, resume=False)  # what `train` with this config runs
        base = run_plan_input(run.cfg, shape_from(model), args.world_size, run.spec, on_gpu=on_gpu)
        if cfg.model.dtype == "auto" and cfg.model.quantization == "none":
            notes.append(
                f"model.dtype auto: the base in {base.base} on {'a GPU' if on_gpu else 'CPU'}"
                + ("" if not on_gpu else " (float32 on CPU: --cpu plans that)")
            )
        keys = ("backend", "base", "lora_rank", "targets", "lora_layers", "lora_dropout", "k")
        keys += ("micro_batch", "grad_accum", "seq_len", "activation_checkpointing", "checkpoint_every", "loss_shards")
        keys += ("offload_activations",)
        keys += ("blocksize_4bit", "double_quant_4bit")
        kw = {k: getattr(base, k) for k in keys}
        if args.data:
            notes += _data_notes(run, args.world_size)
    elif args.accelerate_config:
        raise UserError("--accelerate-config needs --config (the run config it launches)")
    if not model:
        raise UserError("wlora-dist plan: give --model (a preset, config.json or model folder) or --config")
    given_sp = args.sequence_parallel
    if args.backend or args.zero_stage or args.offload is not None or args.shard_size or args.hpz or given_sp:
        given: BackendSpec = kw.get("backend", BackendSpec("fsdp2"))
        kind = args.backend or given.kind
        stage = (args.zero_stage or given.zero_stage or 3) if kind == "zero" else 0
        offload = given.offload if args.offload is None else args.offload
        shard = (args.shard_size or given.shard_size) if kind == "fsdp2" else 0
        hpz = (args.hpz or given.hpz_size) if stage == 3 else 0
        if (args.shard_size and kind != "fsdp2") or (args.hpz and stage != 3):
            raise UserError("--shard-size is for --backend fsdp2 (HSDP), --hpz for --backend zero --zero-stage 3")
        sp = given_sp or given.sequence_parallel
        kw["backend"] = BackendSpec(kind, stage, offload, shard_size=shard, hpz_size=hpz, sequence_parallel=sp)
    flags = {
        "base": args.base,
        "double_quant_4bit": args.double_quant,
        "lora_rank": args.rank,
        "targets": tuple(args.targets.split(",")) if args.targets else None,
        "k": args.k,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "activation_checkpointing": args.activation_checkpointing,
        "checkpoint_every": args.checkpoint_every,
        "loss_shards": args.loss_shards,
        "offload_activations": args.offload_activations,
    }
    kw.update({k: v for k, v in flags.items() if v is not None})
    bad = [t for t in kw.get("targets", ALL_KINDS) if t not in ALL_KINDS]
    if bad:
        raise UserError(f"--targets: {bad} are not decoder linears; choose from {','.join(ALL_KINDS)}")
    if args.nodes is not None or args.gpus_per_node is not None:
        if not (args.nodes and args.gpus_per_node and args.nodes >= 1 and args.gpus_per_node >= 1):
            raise UserError("--nodes N --gpus-per-node G: give both, each >= 1 (the job is N x G ranks)")
        args.world_size = args.nodes * args.gpus_per_node
    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: must be >= 1")
    if args.gpu_gib <= args.reserve_gib:
        raise UserError(f"--gpu-gib {args.gpu_gib}: must exceed --reserve-gib {args.reserve_gib}")
    if not on_gpu:
        kw.setdefault("compute", "fp32")
        if kw.get("base", "bf16") == "bf16":
            kw["base"] = "fp32"
    inp = PlanInput(
        shape_from(model), world_size=args.world_size, gpu_gib=args.gpu_gib, reserve_gib=args.reserve_gib, **kw
    )
    problem = inp.backend.world_problem(inp.world_size)
    if problem:
        raise UserError(problem)
    if args.nodes:
        from wlora_dist.planning.search import node_layouts, pick_layout
        from wlora_dist.planning.text import format_node_layouts, node_layouts_json

        layouts = node_layouts(inp, args.gpus_per_node)
        show = node_layouts_json if args.json else format_node_layouts
        print(show(layouts, pick_layout(layouts), args.nodes, args.gpus_per_node))
        return 0
    p = plan(inp)
    recs = recommend(inp) if args.recommend or not (p.fits_before and p.fits_after) else []
    if args.json:
        print(
            json.dumps(
                {
                    "input": asdict(inp),
                    "before": p.before.as_dict(),
                    "after": p.after.as_dict(),
                    "budget_bytes": p.budget,
                    "fits": {"selection": p.fits_before, "after_prune": p.fits_after},
                    "recommended": [{"settings": d, "before": r.before.total, "after": r.after.total} for d, r in recs],
                },
                indent=2,
            )
        )
        return 0
    for note in notes:
        print(note)
    print(format_plan(p))
    host = host_bytes_per_rank(inp)
    if inp.offload_activations:
        moved = activation_bytes(inp, sites(inp), gates_train=True)["offloaded"]
        print(f"train.offload_activations: {moved / 2**30:.2f} GiB per rank in host memory until backward")
    elif host:
        print(f"host RAM per rank under CPU offload: {host / 2**30:.1f} GiB")
    if p.fits_before and p.fits_after and inp.activation_checkpointing:
        off = plan(replace(inp, activation_checkpointing=False))
        if off.fits_after:
            print(
                "after the prune event the kept adapters fit without activation checkpointing: "
                "memory.replan_at_prune=true switches it off there"
            )
    if recs:
        per_node = min(inp.world_size, args.gpus_per_node or 8)
        print("\nsettings that fit the whole run, fastest first:")
        for d, r in recs[:5]:
            line = f"  {d}: {r.before.total / 2**30:.1f} GiB -> {r.after.total / 2**30:.1f} GiB per rank"
            host = host_bytes_per_rank(r.inp)
            if host:
                line += f"; host RAM {host * per_node / 2**30:.1f} GiB per node ({per_node} ranks)"
            print(line)
    elif not (p.fits_before and p.fits_after):
        print("\nnothing fits: more ranks, a shorter sequence or a smaller model")
    return 0


def _data_notes(run, world_size: int) -> list[str]:  # type: ignore[no-untyped-def]
    """What the data (read and tokenised as train reads them, the copy kept for it) say
    about the plan's rows: a plan counts data.seq_len tokens per row, but unpacked
    instruction / chat rows are padded only to the longest row of their micro-batch; and
    data that cannot fill a micro-batch on every rank make the run refuse."""
    from wlora_dist.data.pipeline import fill_problem, prepare
    from wlora_dist.model.loading import load_tokenizer
    from wlora_dist.paths import looks_local

    cfg = run.cfg
    if not cfg.data.train or not all(looks_local(s) for s in cfg.data.train):
        return ["data: not read (hub datasets); the plan counts data.seq_len tokens per row"]
    try:
        train, _, _ = prepare(cfg.data, cfg.train.seed, load_tokenizer(cfg.model), run.paths.data_cache)
    except UserError as e:
        return [f"data: train would refuse them: {e}"]
    notes = []
    problem = fill_problem(len(train), cfg.train.micro_batch_size, world_size)
    if problem:
        notes.append(f"data: train would refuse them: {problem}")
    lengths = [len(x) for x in train["input_ids"]]
    longest, seq_len = max(lengths), cfg.data.seq_len
    packed = "position_ids" in train.column_names or cfg.data.format == "text"
    if not packed and longest < seq_len:
        mean = sum(lengths) / len(lengths)
        notes.append(
            f"data: {len(train)} rows of at most {longest} tokens (mean {mean:.0f}) against data.seq_len={seq_len}: "
            f"micro-batches are padded to their longest row, so the plan (seq_len tokens per row) is an upper "
            f"bound; --seq-len {longest} plans the longest micro-batch (data.packing fills rows to seq_len)"
        )
    else:
        notes.append(
            f"data: {len(train)} rows; {'packed to' if packed else 'at most'} {seq_len} tokens each, as planned"
        )
    return notes


def _accelerate_launch(path: str) -> dict:
    """What an accelerate config file says about the launch: num_processes (all machines')
    and use_cpu, read as written (accelerate's own launch code, accelerate_config_env,
    would turn use_cpu on wherever the planning machine has no GPU: a login node)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"--accelerate-config {path}: {e.strerror}") from None
    return {k: data[k] for k in ("num_processes", "use_cpu") if k in data}


def add_parser(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser(
        "plan",
        help="per-rank memory before/after the prune event; does it fit, and what would",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan a run's memory per rank (base weights, adapters, gradients, optimizer state, "
        "activations, logits, gathered units) in the selection phase and after the prune event, and say "
        "whether it fits the GPU. Counts are checked against measured peaks (tests/test_memory_plan.py).",
        epilog="examples:\n  wlora-dist plan --model llama3-70b --world-size 8 --gpu-gib 24 --base int8 "
        "--activation-checkpointing\n  wlora-dist plan --config configs/llama3_8b_instruct.yaml --world-size 8 "
        "--gpu-gib 80\n  wlora-dist plan --config configs/llama3_8b_instruct.yaml --accelerate-config "
        "launch/accelerate/zero3.yaml --world-size 8\n  wlora-dist plan --model llama3-8b --gpu-gib 40 --recommend\n  "
        "wlora-dist plan --model llama3-70b --base nf4 --nodes 4 --gpus-per-node 8 --gpu-gib 80",
    )
    from wlora_dist.planning.sources import PRESETS

    pl.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}), a config.json or a model folder")
    pl.add_argument("--config", "-c", help="a run config YAML: its model, adapter, batch and backend settings")
    pl.add_argument(
        "--accelerate-config",
        help="with --config: the accelerate config you launch with (its backend, as accelerate launch passes it)",
    )
    pl.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    pl.add_argument(
        "--world-size", type=int, help="ranks (GPUs) in the job (default: --accelerate-config's num_processes, or 1)"
    )
    pl.add_argument(
        "--cpu", action="store_true", help="a run on CPU: float32 base and compute (model.dtype auto loads float32)"
    )
    pl.add_argument(
        "--nodes", type=int, help="with --gpus-per-node: compare FSDP2, HSDP, ZeRO-3 and hpZ on N x G ranks"
    )
    pl.add_argument("--gpus-per-node", type=int, help="GPUs per node (with --nodes)")
    pl.add_argument(
        "--shard-size", type=int, help="FSDP2 hybrid sharding: ranks per shard group (distributed.fsdp.shard_size)"
    )
    pl.add_argument(
        "--hpz", type=int, help="ZeRO-3 hpZ: ranks of the secondary partition (distributed.zero.hpz_partition_size)"
    )
    pl.add_argument(
        "--sequence-parallel",
        type=int,
        help="ranks sharing each sequence (distributed.sequence_parallel): each keeps 1/N of the activations",
    )
    pl.add_argument(
        "--offload-activations",
        action="store_true",
        default=None,
        help="train.offload_activations: what backward needs waits in host memory (one layer's on the GPU)",
    )
    pl.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    pl.add_argument(
        "--reserve-gib", type=float, default=2.0, help="left out of the budget: CUDA context, NCCL, fragmentation"
    )
    pl.add_argument(
        "--backend", choices=["fsdp2", "zero", "replicated"], help="default fsdp2, or what --config resolves to"
    )
    pl.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="with --backend zero (default 3)")
    pl.add_argument(
        "--base", choices=["bf16", "int8", "nf4"], help="frozen base: bf16 (default), int8, or nf4 (bnb 4-bit)"
    )
    pl.add_argument(
        "--double-quant",
        action="store_true",
        default=None,
        help="with --base nf4: bitsandbytes' double quantisation of the absmax (model.bnb_4bit_use_double_quant)",
    )
    pl.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    pl.add_argument("--targets", help="comma-separated linears with adapters (default all seven)")
    pl.add_argument(
        "--k",
        type=_count_or_share,
        help="adapters kept after the prune event: a count, or a share of n in (0, 1) as selection.k takes "
        "(default 32; with --config, its selection.k)",
    )
    pl.add_argument("--micro-batch", type=int, help="rows per rank per forward (default 1)")
    pl.add_argument("--seq-len", type=int, help="tokens per row (default 2048)")
    ckpt = pl.add_mutually_exclusive_group()
    ckpt.add_argument("--activation-checkpointing", action="store_true", default=None)
    ckpt.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    pl.add_argument("--checkpoint-every", type=int, help="checkpoint decoder layers 0, N, 2N, ... only (default 1)")
    pl.add_argument("--loss-shards", type=int, help="train.loss_shards: the cross-entropy in N tiles (default 0)")
    pl.add_argument("--offload", action="store_true", default=None, help="FSDP2 cpu_offload / ZeRO offload")
    pl.add_argument("--recommend", action="store_true", help="also list settings that fit (always when it does not)")
    pl.add_argument(
        "--no-data",
        dest="data",
        action="store_false",
        help="with --config: do not read the data (by default they are read and tokenised as train reads them, "
        "the copy kept for train, to say whether their rows are as long as data.seq_len and fill the batches)",
    )
    pl.add_argument("--json", action="store_true", help="print JSON")
