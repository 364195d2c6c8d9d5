"""Side by side, one command: plain peft LoRA vs WeightLoRA on the same model, data and
backend, each configuration in a fresh process (memory of an earlier model in the same
process would inflate later peaks).

    python benchmarks/compare.py --mode tiny-cpu            # seconds, any machine
    python benchmarks/compare.py --mode 8b                  # one GPU (H100 80 GB)
    python benchmarks/compare.py --mode 70b-int8-ws8        # one GPU standing in for rank 0 of 8
    python benchmarks/compare.py --mode 8b-fsdp2 --only c   # the prune event under FSDP2 (NCCL)
    python benchmarks/compare.py --mode 8b+compile --only cd # train.compile on (c) and (d)
    python benchmarks/compare.py --mode 8b --standin        # the same steps on a tiny CPU stand-in
    (modes: tiny-cpu, 1b, 1b-int8, 1b-nf4, 8b, 8b-48gb, 8b-fsdp2, 8b-zero3, 70b-bf16-ws8,
     70b-int8-ws8, 70b-nf4-ws8; "+compile" adds train.compile, "+liger" liger-kernel's fused
     Llama kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy; GPU only))

Configurations:
  (a) plain peft LoRA on all n adapters
  (b) wlora_dist during selection (n adapters, gates training)
  (c) wlora_dist after the prune event (K kept, removed ones physically gone)
  (d) plain peft LoRA on exactly the K adapters (c) kept
  (e) wlora_dist after the prune event with memory.replan_at_prune (modes with
      activation checkpointing): checkpointing switched off where the plan says K fit

Each reports tokens/s (of the median of at least 10 timed steps after the warm-up, with
their spread; per GPU too) and its ratio to (a), model-FLOPs utilisation against a
measured peak (--peak-tflops; benchmarks/flops.py says what is counted), the peak memory of
a step (torch.cuda on a GPU; CPU: profiler allocation events on top of resident bytes),
the planner's figure for the same step, and per-rank bytes of trainable parameters,
gradients and optimizer state (counted from the tensors). (a) runs first, so a mode cut
short by its time still holds a ratio. Writes results.json, results.md and results.png to --out.
World sizes > 1 run rank 0 alone with torch's fake process group: shapes, shards and
peaks are real, collectives are no-ops (tokens/s leaves communication out).
Timings are measurements, never assertions (tests/test_benchmarks.py only checks that
the tiny mode runs and its counts are consistent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import flops  # noqa: E402
from wlora_dist.distributed.spec import BackendSpec  # noqa: E402
from wlora_dist.planning import memory_plan  # noqa: E402
from wlora_dist.planning.memory_plan import GiB, PlanInput, breakdown, plan, sites  # noqa: E402
from wlora_dist.planning.shapes import LINEARS, ModelShape  # noqa: E402
from wlora_dist.planning.sources import PRESETS  # noqa: E402


@dataclass
class Mode:
    shape: ModelShape
    micro_batch: int
    seq_len: int
    k: int
    rank: int = 16
    targets: tuple[str, ...] = LINEARS
    device: str = "cuda"
    world_size: int = 1
    backend: str = "replicated"
    quant: str = "none"  # the frozen base: none (the compute dtype), int8 or nf4
    double_quant: bool = False  # nf4: QLoRA's double quantisation of the absmax
    checkpointing: bool = False
    loss_shards: int = 0  # train.loss_shards (0: transformers' loss)
    budget_gib: float = 0.0  # > 0: also run (e), re-planning at the prune event under this budget
    reserve_gib: float = 2.0  # of the budget, left to the CUDA context / NCCL / fragmentation
    warmup: int = 2
    timed: int = 10
    compile: bool = False  # train.compile: every decoder layer through torch.compile
    liger: bool = False  # liger-kernel's fused Llama kernels (GPU only)
    notes: list[str] = field(default_factory=list)


_70B_WS8 = Mode(
    PRESETS["llama3-70b"],
    micro_batch=1,
    seq_len=2048,
    k=32,
    world_size=8,
    backend="fsdp2",
    checkpointing=True,
    warmup=1,
    timed=10,
    notes=["rank 0 of 8 via the fake process group: one rank, compute only (communication left out of tokens/s)"],
)

MODES: dict[str, Mode] = {
    "tiny-cpu": Mode(
        ModelShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=4096),
        micro_batch=2,
        seq_len=256,
        k=4,
        rank=8,
        device="cpu",
        checkpointing=True,
        budget_gib=0.5,
        reserve_gib=0.0,
        warmup=1,
        timed=10,
        notes=["CPU timings are noisy; this mode exists to run the whole pipeline in seconds"],
    ),
    "1b": Mode(PRESETS["llama3.2-1b"], micro_batch=4, seq_len=2048, k=16),
    "8b": Mode(PRESETS["llama3-8b"], micro_batch=2, seq_len=2048, k=32),
    "8b-48gb": Mode(
        PRESETS["llama3-8b"],
        micro_batch=2,
        seq_len=2048,
        k=32,
        checkpointing=True,
        budget_gib=48.0,
        notes=[
            "a 48 GB card (A6000 / L40S) simulated by the plan's budget: all 224 adapters need activation "
            "checkpointing there, 32 kept ones do not (docs/measurements.md: 48.0 vs 39.0 GiB without it)"
        ],
    ),
    "1b-int8": Mode(
        PRESETS["llama3.2-1b"],
        micro_batch=2,
        seq_len=2048,
        k=16,
        quant="int8",
        notes=["8-bit base (Int8Linear, bitsandbytes kernels) vs docs/measurements.md's bf16 numbers at 1B"],
    ),
    "1b-nf4": Mode(
        PRESETS["llama3.2-1b"],
        micro_batch=2,
        seq_len=2048,
        k=16,
        quant="nf4",
        double_quant=True,
        notes=["NF4 base with double quantisation (QLoRA's; Linear4bit, bitsandbytes kernels), lm_head in bf16"],
    ),
    # The prune event's cost at 8B under each sharding backend, on a real one-rank NCCL group.
    "8b-fsdp2": Mode(PRESETS["llama3-8b"], micro_batch=2, seq_len=2048, k=32, backend="fsdp2", checkpointing=True),
    "8b-zero3": Mode(PRESETS["llama3-8b"], micro_batch=2, seq_len=2048, k=32, backend="zero3", checkpointing=True),
    "70b-bf16-ws8": _70B_WS8,
    "70b-int8-ws8": replace(_70B_WS8, quant="int8"),
    # Tiled loss: transformers' keeps three fp32 copies of the 128k-vocabulary logits at the
    # peak, planned 1.5 GiB of the 12.4 (the 12 GiB target's margin).
    "70b-nf4-ws8": replace(
        _70B_WS8,
        quant="nf4",
        double_quant=True,
        loss_shards=8,
        notes=[*_70B_WS8.notes, "NF4 base with double quantisation, lm_head in bf16; train.loss_shards 8"],
    ),
}

VARIANTS = ("compile", "liger")

# The CPU stand-in of every mode (benchmarks/gpu/run.sh with WLORA_GPU_STANDIN=1): the same
# backend, world size, base precision and schedule on a two-layer model, so the steps and
# files of a device call are exercised in seconds. Hidden 64 and intermediate 128:
# multiples of the 4-bit block size.
STANDIN_SHAPE = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512)


def mode_for(spec: str, standin: bool = False) -> Mode:
    """A mode from its spec: a name of MODES, then "+compile" / "+liger" in any order
    (e.g. "8b+compile+liger"); ``standin``: its CPU stand-in."""
    name, *variants = spec.split("+")
    if name not in MODES or any(v not in VARIANTS for v in variants):
        raise ValueError(f"mode {spec!r}: one of {sorted(MODES)}, optionally + one or more of {list(VARIANTS)}")
    mode = replace(MODES[name], **{v: True for v in variants})
    if standin and mode.device != "cpu":  # a CPU mode is its own stand-in
        mode = replace(
            mode,
            shape=STANDIN_SHAPE,
            micro_batch=2,
            seq_len=64,
            k=4,
            rank=4,
            device="cpu",
            budget_gib=0.0,
            warmup=1,
            notes=[f"CPU stand-in of {spec} (a two-layer model): timings and peaks mean nothing"],
        )
    return mode


# ---------------------------------------------------------------- one configuration (worker)


def run_config(mode: Mode, which: str, keep: list[str] | None) -> dict:
    import torch

    from benchmarks.harness import fake_world

    if mode.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this mode needs a GPU; none here (try --mode tiny-cpu or --standin)")
    if mode.liger and mode.device != "cuda":
        raise SystemExit("+liger needs a GPU: liger-kernel's kernels are triton kernels")
    with fake_world(mode.world_size, BackendSpec.parse(mode.backend).kind):
        return _run_config(mode, which, keep, torch.device(mode.device))


def _run_config(mode: Mode, which: str, keep: list[str] | None, device) -> dict:
    import torch

    from benchmarks.harness import Harness, bench_config, kept_layer_kinds, random_llama
    from wlora_dist.distributed.env import DistEnv

    env = DistEnv(0, 0, mode.world_size, device)
    wlora = which in ("b", "c", "e")
    # (b) is timed inside the selection phase, (c) / (e) after the prune event at step T.
    steps_t = mode.warmup + mode.timed + 2
    overrides = {
        "adapter.lora_rank": mode.rank,
        "adapter.lora_alpha": 2.0 * mode.rank,
        "adapter.target_modules": list(mode.targets),
        "selection.method": "topk" if wlora else "none",
        "selection.k": mode.k,
        "selection.steps": steps_t,
        "selection.project_every": steps_t,  # one projection, at T: (b) is timed before any
        "train.max_steps": 10_000,
        "train.micro_batch_size": mode.micro_batch,
        "data.seq_len": mode.seq_len,
        "model.gradient_checkpointing": mode.checkpointing,
        "train.loss_shards": mode.loss_shards,
        "distributed.backend": BackendSpec.parse(mode.backend).kind,
        "train.compile": mode.compile,
    }
    if BackendSpec.parse(mode.backend).kind == "zero":
        overrides["distributed.zero.stage"] = BackendSpec.parse(mode.backend).zero_stage
    if which == "d":
        # Plain peft on exactly (b)'s kept set, attached to those K linears only: attaching
        # all n and removing the rest visited removed adapters when a meta-built (8-bit)
        # base was materialised (KeyError "adapter ... was removed" in the 1b-int8 mode).
        assert keep, "(d) needs the set (b) keeps"
        overrides["adapter.target_modules"] = list(keep)
    if which == "e":
        overrides.update(
            {
                "memory.replan_at_prune": True,
                "memory.budget_gib": mode.budget_gib,
                "memory.reserve_gib": mode.reserve_gib,
            }
        )
    cfg = bench_config(overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if mode.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Patches transformers' Llama classes before the model is built; the fused linear
        # cross-entropy replaces the loss unless the mode tiles it (train.loss_shards).
        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=not mode.loss_shards
        )
    model = random_llama(
        mode.shape, device, dtype, quant=mode.quant, meta=mode.backend == "fsdp2", double_quant=mode.double_quant
    )
    t0 = time.perf_counter()
    h = Harness.build(cfg, env, model, plain_lora=not wlora)
    setup_s = time.perf_counter() - t0
    prune_s = layout_s = None
    if which in ("c", "e"):
        for _ in range(steps_t):
            m = h.run_step()
        prune_s = m.get("prune_seconds")
        layout_s = m.get("prune_layout_seconds")
    for _ in range(mode.warmup):
        h.run_step()
    timing = h.timed_steps(mode.timed)
    measured = h.measured_step()
    if which == "b":
        assert h.step < steps_t, "(b) must be measured inside the selection phase"
    adapters = len(h.trainer.wl.kept_sites())
    if which == "b":  # the selection this run would make: go on to the prune event
        while h.step < steps_t:
            h.run_step()
    kept = [s.name for s in h.trainer.wl.kept_sites()]
    site_kinds = [(s.layer, s.kind) for s in h.trainer.wl.sites if s.name in kept or which in "ab"]
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in h.trainer.wl.base_model.modules())
    out = {
        "config": which,
        **timing,
        "peak_bytes": measured["peak_bytes"],
        "reserved_peak_bytes": measured["reserved_peak_bytes"],
        "resident_bytes": measured["resident_bytes"],
        "loss": measured.get("loss"),  # of the measured step: finite, or the numbers mean nothing
        "per_rank_bytes": h.step_bytes.last,
        "adapters": adapters,
        "kept": kept,
        "kept_sites": kept_layer_kinds(h),
        "prune_seconds": prune_s,  # the event as the trainer times it: two probe forwards included
        "prune_layout_seconds": layout_s,  # the layout change itself: selector + backend rebuild
        "setup_seconds": setup_s,
        "activation_checkpointing": checkpointing,
        "compile": mode.compile,
        "liger": mode.liger,
        "flops_per_token": flops.flops_per_token(mode.shape, mode.seq_len, mode.rank, [k for _, k in site_kinds]),
        "scope": "one rank, compute only" if mode.world_size > 1 else "the whole step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    return out


# ---------------------------------------------------------------- the comparison (driver)


def _planned_or_none(mode: Mode, which: str, result: dict | None = None) -> int | None:
    """The planner's peak for a configuration; for a failed one (no kept set measured) the
    bound over the K largest adapters, so an out-of-memory line says what was planned."""
    try:
        kept = result["kept_sites"] if result else None
        return planned(mode, which, kept, result["activation_checkpointing"] if result else mode.checkpointing)
    except Exception:  # a planning gap must not lose the measured line
        return None


def planned(mode: Mode, which: str, kept: list[list] | None, checkpointing: bool) -> int:
    """The planner's peak for configuration ``which`` (plain peft: no gate products);
    ``kept``: (layer, module) of the K adapters (c) kept; None: the planner's bound (the K
    largest)."""
    kept_sites = tuple((int(layer), str(kind)) for layer, kind in kept) if kept is not None else None
    on_gpu = mode.device == "cuda"
    inp = PlanInput(
        mode.shape,
        mode.world_size,
        BackendSpec.parse(mode.backend),
        base=mode.quant if mode.quant != "none" else ("bf16" if on_gpu else "fp32"),
        double_quant_4bit=mode.double_quant,
        compute="bf16" if on_gpu else "fp32",
        lora_rank=mode.rank,
        targets=mode.targets,
        k=mode.k,
        micro_batch=mode.micro_batch,
        seq_len=mode.seq_len,
        activation_checkpointing=checkpointing,  # as the run had it ((e): after its switch)
        loss_shards=mode.loss_shards,
        kept=kept_sites,
    )
    if which == "a":
        return breakdown(inp, sites(inp), gates_train=False).total
    if which == "b":
        return plan(inp).before.total
    if which == "d":
        return breakdown(inp, memory_plan.kept_sites(inp), gates_train=False).total
    return plan(inp).after.total


def run_worker(
    spec: str, which: str, keep: list[str] | None, timeout: float, timed: int | None, standin: bool = False
) -> dict:
    cmd = [sys.executable, __file__, "--mode", spec, "--worker", which]
    if timed is not None:
        cmd += ["--timed", str(timed)]
    if keep is not None:
        cmd += ["--keep", json.dumps(keep)]
    if standin:
        cmd.append("--standin")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise ConfigurationFailed(f"configuration ({which}) ran past its timeout, {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise ConfigurationFailed(f"configuration ({which}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ConfigurationFailed(RuntimeError):
    """One configuration's worker failed (out of memory, a crash, its timeout): recorded,
    and the mode goes on with the others."""


SHORT = {"a": "plain, n", "b": "selection, n", "c": "pruned, K", "d": "plain, K", "e": "pruned, re-planned"}
LABELS = {
    "a": "(a) plain peft LoRA, all n",
    "b": "(b) wlora_dist, selection (n + gates)",
    "c": "(c) wlora_dist after prune (K)",
    "d": "(d) plain peft LoRA on the same K",
    "e": "(e) (c) + re-plan at prune",
}
MIN_CONFIG_S = 10.0  # a configuration given less than this by the deadline is not started


def compare(
    spec: str,
    out: Path,
    timeout: float,
    timed: int | None = None,
    only: str = "abcde",
    *,
    standin: bool = False,
    deadline: float | None = None,
    peak_tflops: float | None = None,
    on_line: Callable[[dict], None] | None = None,
) -> dict:
    """Configurations ``only`` of mode ``spec`` (default all; (d) needs (b)'s kept set, so
    asks for (b)), (a) first. Each gets ``timeout`` seconds, or what is left before
    ``deadline`` (time.time()); one that would get less than MIN_CONFIG_S is recorded as
    skipped. ``on_line``: called with each configuration's line as it ends."""
    mode = mode_for(spec, standin)
    if timed is not None:
        mode = replace(mode, timed=timed)
    wanted = set(only) | ({"b"} if "d" in only else set())
    if not (mode.checkpointing and mode.budget_gib):
        wanted.discard("e")
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "partial.jsonl"
    partial.write_text("")  # one line per configuration as it ends: a mode stopped mid-way keeps them
    for which in "abcde":  # (a) first: the baseline every ratio needs; (d) after (b), whose set it trains
        if which not in wanted:
            continue
        left = timeout if deadline is None else min(timeout, deadline - time.time())
        try:
            if which == "d" and "b" not in results:
                raise ConfigurationFailed("configuration (d) needs the set (b) keeps, and (b) failed")
            if left < MIN_CONFIG_S:
                raise ConfigurationFailed(f"configuration ({which}) skipped: {max(left, 0):.0f} s left of the budget")
            keep = results["b"]["kept"] if which == "d" else None
            r = results[which] = run_worker(spec, which, keep, left, timed, standin)
            r["mfu"] = flops.mfu(r["flops_per_token"], r["tokens_per_s_per_gpu"], (peak_tflops or 0) * 1e12)
            line = {**r, "planned_peak_bytes": _planned_or_none(mode, which, r)}
        except ConfigurationFailed as e:
            failed[which] = str(e)
            line = {"config": which, "error": str(e)[-2000:], "planned_peak_bytes": _planned_or_none(mode, which)}
            print(f"({which}) failed; going on with the others: {str(e).splitlines()[0]}", file=sys.stderr)
        line = {"mode": spec, **line}
        with open(partial, "a") as f:
            f.write(json.dumps(line) + "\n")
        if on_line is not None:
            on_line(line)
    if not results:
        raise SystemExit(f"every configuration of {spec} failed; see {partial}")
    # The K adapters the run kept ((a) keeps all n): the planner's bound where no run pruned.
    kept_sites = next((results[w]["kept_sites"] for w in "bcde" if w in results), None)
    base = results["a"]["tokens_per_s"] if "a" in results else None
    for which, r in results.items():
        r["label"] = LABELS[which]
        r["ratio_to_a"] = r["tokens_per_s"] / base if base else None
        r["planned_peak_bytes"] = planned(mode, which, kept_sites, r["activation_checkpointing"])

    def ratio(x: str, y: str, minus: float = 0.0) -> float | None:
        return results[x]["tokens_per_s"] / results[y]["tokens_per_s"] - minus if {x, y} <= results.keys() else None

    summary = {
        "mode": spec,
        "standin": standin,
        "settings": {k: v for k, v in asdict(mode).items() if k != "shape"},
        "shape": asdict(mode.shape),
        "results": [results[w] for w in sorted(results)],
        "selection_overhead": ratio("a", "b", 1.0),
        "c_over_a": ratio("c", "a"),
        "c_vs_d": ratio("c", "d", 1.0),
        "prune_seconds": results["c"]["prune_seconds"] if "c" in results else None,
        "prune_layout_seconds": results["c"].get("prune_layout_seconds") if "c" in results else None,
        "peak_tflops": peak_tflops,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "failed": failed,
    }
    if {"e", "c"} <= results.keys():
        summary["e_over_c"] = ratio("e", "c")
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary))
    chart(summary, out / "results.png")
    return summary


def markdown(s: dict) -> str:
    mib = 2**20
    lines = [
        f"# {s['mode']}: {s['results'][0]['device']}, micro-batch {s['settings']['micro_batch']} x "
        f"{s['settings']['seq_len']}, LoRA r={s['settings']['rank']}, K={s['settings']['k']}, "
        f"backend {s['settings']['backend']} (world size {s['settings']['world_size']})",
        "",
        "| configuration | adapters | act. ckpt | tokens/s per GPU | spread | vs (a) | MFU | peak GiB | reserved GiB | "
        "planned GiB | params MiB | grads MiB | optimizer MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["results"]:
        b = r["per_rank_bytes"]
        reserved = r.get("reserved_peak_bytes")
        lines.append(
            f"| {r['label']} | {r['adapters']} | {'yes' if r['activation_checkpointing'] else 'no'} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['spread']:.1%} | {_x(r['ratio_to_a'])} | "
            f"{_pct(r.get('mfu'), '')} | "
            f"{r['peak_bytes'] / GiB:.3g} | {'-' if reserved is None else f'{reserved / GiB:.3g}'} | "
            f"{r['planned_peak_bytes'] / GiB:.3g} | {b['trainable_param_bytes'] / mib:.2f} | "
            f"{b['grad_bytes'] / mib:.2f} | {b['optimizer_state_bytes'] / mib:.2f} |"
        )
    for which, message in s.get("failed", {}).items():
        lines.append(f"| {LABELS[which]} | failed: {message.splitlines()[0]} |" + " |" * 11)
    lines.append("")
    if s["selection_overhead"] is not None:
        lines.append(f"- selection overhead, (a) over (b): {s['selection_overhead']:+.1%}")
    if s["c_over_a"] is not None or s["c_vs_d"] is not None:
        lines.append(f"- after the prune event, (c) / (a): {_x(s['c_over_a'])}; (c) vs (d): {_pct(s['c_vs_d'])}")
    if s["prune_seconds"] is not None:
        layout = s.get("prune_layout_seconds")
        of_which = f" (the layout change itself: {layout:.3f} s; the rest is two probe forwards)" if layout else ""
        lines.append(f"- prune event: {s['prune_seconds']:.3f} s{of_which}")
    if "e_over_c" in s:
        lines.append(f"- re-planning at the prune event, (e) / (c): {s['e_over_c']:.2f}x")
    first = s["results"][0]
    lines.append(
        f"- tokens/s: the median of {first['steps']} timed steps after {s['settings']['warmup']} warm-up steps; "
        f"spread: (p90 - p10) / median; {first['scope']}"
    )
    peak = s.get("peak_tflops")
    against = f"{peak:.0f} TFLOP/s measured in the same call" if peak else "no measured peak (-)"
    lines.append(f"- MFU: model FLOPs per token (benchmarks/flops.py) x tokens/s per GPU, against {against}")
    lines += [f"- {n}" for n in s["settings"]["notes"]]
    lines.append(f"- per-rank bytes: counted from the tensors while the gradients exist; {s['time']}")
    return "\n".join(lines) + "\n"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None, sign: str = "+") -> str:
    return "-" if v is None else f"{v:{sign}.1%}"


def chart(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = s["results"]
    names = [f"({r['config']}) {SHORT[r['config']]}" for r in rs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(names, [r["ratio_to_a"] or 0.0 for r in rs], color="tab:blue")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_title("tokens/s relative to (a) plain peft LoRA, all n")
    ax1.tick_params(axis="x", labelsize=7)
    x = range(len(rs))
    ax2.bar([i - 0.2 for i in x], [r["peak_bytes"] / GiB for r in rs], width=0.4, label="measured")
    ax2.bar([i + 0.2 for i in x], [r["planned_peak_bytes"] / GiB for r in rs], width=0.4, label="planned")
    ax2.set_xticks(list(x), names, fontsize=7)
    ax2.set_title("peak memory per rank, GiB")
    ax2.legend()
    st = s["settings"]
    fig.suptitle(
        f"{s['mode']} ({rs[0]['device']}): micro-batch {st['micro_batch']} x {st['seq_len']}, r={st['rank']}, "
        f"K={st['k']}, {st['backend']} world size {st['world_size']}",
        size=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="tiny-cpu", help=f"one of {sorted(MODES)}, optionally +compile / +liger")
    ap.add_argument("--out", help="folder for results.json / .md / .png (default benchmarks/results/<mode>)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    ap.add_argument("--timed", type=int, help="timed steps per configuration (default: the mode's)")
    ap.add_argument("--only", default="abcde", help="configurations to run, e.g. 'c' or 'abcd' (default all)")
    ap.add_argument("--standin", action="store_true", help="the mode's CPU stand-in (a two-layer model)")
    ap.add_argument("--peak-tflops", type=float, help="the device's measured peak, for MFU")
    ap.add_argument("--worker", choices=list(LABELS), help=argparse.SUPPRESS)
    ap.add_argument("--keep", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        mode = mode_for(args.mode, args.standin)
    except ValueError as e:
        ap.error(str(e))
    if args.worker:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        keep = json.loads(args.keep) if args.keep else None
        mode = mode if args.timed is None else replace(mode, timed=args.timed)
        print(json.dumps(run_config(mode, args.worker, keep)))
        return 0
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / args.mode
    s = compare(args.mode, out, args.timeout, args.timed, args.only, standin=args.standin, peak_tflops=args.peak_tflops)
    print(markdown(s))
    print(f"-> {out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
