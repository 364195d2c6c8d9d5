"""Which settings fit: the search over backends, bases, offload, activation checkpointing
and micro-batch sizes (`wlora-dist plan --recommend`), and the re-plan at the prune event.
Each candidate is priced by memory_plan.plan."""

from __future__ import annotations

from dataclasses import replace

from wlora_dist.distributed.spec import BackendSpec, check_heads
from wlora_dist.planning.memory_plan import Plan, PlanInput, plan


def recommend(inp: PlanInput) -> list[tuple[str, Plan]]:
    """Settings that fit ``inp.gpu_gib`` for the whole run, fastest first by rule of thumb:
    no offload (it moves every shard over PCIe each step) over offload, a bf16 base over
    int8 (~2x per token at 1B, docs/measurements.md) over nf4, fewer ranks per sequence
    (each adds two all-to-alls per layer) over more, no activation checkpointing over
    checkpointing, a larger micro-batch (up to the one asked for) over a smaller one."""
    found: list[tuple[tuple, str, Plan]] = []
    kinds = [BackendSpec("fsdp2"), BackendSpec("zero", 3), BackendSpec("zero", 2)]
    if inp.world_size == 1:
        kinds = [BackendSpec("replicated"), *kinds]
    bases = ("bf16", "int8", "nf4")
    options = _activation_options(inp)
    settings = [
        (o, s, b, off, opt) for o, s in enumerate(kinds) for b in bases for off in (False, True) for opt in options
    ]
    for order, spec, base, offload, (sp, acts_out, ckpt) in settings:
        mb = inp.micro_batch
        while mb >= 1:
            cand = replace(
                inp,
                backend=replace(spec, offload=offload, sequence_parallel=sp),
                base=base,  # type: ignore[arg-type]
                activation_checkpointing=ckpt,
                micro_batch=mb,
                offload_activations=acts_out,
            )
            p = plan(cand)
            if p.fits_before and p.fits_after:
                cost = (offload, bases.index(base), sp, acts_out, ckpt, -mb, order)
                found.append(((*cost, p.before.total), describe_settings(cand), p))
                break
            mb //= 2
    found.sort(key=lambda x: x[0])
    return [(d, p) for _, d, p in found]


LONG = 4096  # tokens from which --recommend tries sequence parallelism and activation offloading


def sequence_parallel_sizes(inp: PlanInput) -> list[int]:
    """Ranks per sequence worth trying: 1, and at long sequences (4096 tokens and more) the
    powers of two that divide the world and whose heads the ranks can share."""
    sizes = [1]
    if inp.seq_len >= LONG:
        n = 2
        while n <= inp.world_size:
            if inp.world_size % n == 0 and check_heads(inp.shape.heads, inp.shape.kv_heads, n) is None:
                sizes.append(n)
            n *= 2
    return sizes


def _activation_options(inp: PlanInput) -> list[tuple[int, bool, bool]]:
    """(ranks per sequence, activations offloaded, activation checkpointing) to try: at long
    sequences sharing and offloading too (offloading the checkpointed inputs only: its
    copies cross PCIe every step)."""
    offload = (False, True) if inp.seq_len >= LONG else (inp.offload_activations,)
    return [
        (sp, off, ckpt)
        for sp in sequence_parallel_sizes(inp)
        for off in offload
        for ckpt in ((True,) if off else (False, True))
    ]


def node_layouts(inp: PlanInput, gpus_per_node: int) -> list[tuple[str, Plan]]:
    """The sharded layouts of a job of ``inp.world_size`` ranks on nodes of
    ``gpus_per_node``: FSDP2 over every rank, HSDP (sharded in a node, replicated across
    nodes), ZeRO-3, ZeRO-3 with hpZ over a node. Per-rank bytes of each, same settings."""
    ws, g = inp.world_size, gpus_per_node
    specs = [("FSDP2", BackendSpec("fsdp2", 0, inp.backend.offload))]
    if 1 < g < ws:
        specs.append(("HSDP", BackendSpec("fsdp2", 0, inp.backend.offload, shard_size=g)))
    specs.append(("ZeRO-3", BackendSpec("zero", 3, inp.backend.offload)))
    if 1 < g < ws:
        specs.append(("ZeRO-3 hpZ", BackendSpec("zero", 3, inp.backend.offload, hpz_size=g)))
    return [(name, plan(replace(inp, backend=spec))) for name, spec in specs]


def pick_layout(layouts: list[tuple[str, Plan]]) -> str | None:
    """HSDP when it fits (the base's all-gathers stay in a node; only gradients cross), else
    the first that fits in FSDP2, ZeRO-3, hpZ order; None when none does."""
    fitting = [name for name, p in layouts if p.fits_before and p.fits_after]
    if "HSDP" in fitting:
        return "HSDP"
    return fitting[0] if fitting else None


def _ckpt_words(inp: PlanInput) -> str:
    if not inp.activation_checkpointing:
        return "no activation checkpointing"
    if inp.checkpoint_every == 1:
        return "activation checkpointing"
    return f"activation checkpointing every {inp.checkpoint_every} layers"


def describe_settings(inp: PlanInput) -> str:
    bits = [
        inp.backend.describe(inp.world_size),
        f"{inp.base} base",
        f"micro_batch {inp.micro_batch}",
        _ckpt_words(inp),
    ]
    if inp.offload_activations:
        bits.append("activations offloaded (train.offload_activations)")
    return ", ".join(bits)


def replan_after_prune(inp: PlanInput) -> PlanInput | None:
    """At the prune event the kept set may need less activation checkpointing: off if the
    plan fits without it, else the fewest checkpointed layers (the largest N of
    checkpoint_every) that fit. None when nothing fewer than the current setting fits."""
    if not inp.activation_checkpointing:
        return None
    off = replace(inp, activation_checkpointing=False)
    if plan(off).fits_after:
        return off
    for n in range(inp.shape.layers, inp.checkpoint_every, -1):
        cand = replace(inp, checkpoint_every=n)
        if plan(cand).fits_after:
            return cand
    return None
