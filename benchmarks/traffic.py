"""The bytes a step's collectives move, measured against the planner's model
(wlora_dist/planning/traffic.py): real gloo processes on CPU, every c10d op counted
(benchmarks/collectives.py), 4 ranks taken as 2 "nodes" of 2.

    python -m benchmarks.traffic              # measured vs planned, every case (about 4 min on 2 cores)
    python -m benchmarks.traffic --table      # the planned table of docs/measurements.md (no run)

One Llama, 24 decoder layers of hidden 64 (deep, so that what DeepSpeed keeps gathered
around the last layer is small beside what it gathers), trained under FSDP2, HSDP 2 x 2
(float and 8-bit base), ZeRO-3 and ZeRO-3 hpZ, with activation checkpointing and gradient
accumulation in some. A selection step (step 2: step 1 records ZeRO-3's trace) and a step
after the prune event (step 7, the fourth on the rebuilt layout: DeepSpeed broadcasts a few
KiB in the third) are compared, per rank,
inside a node and across nodes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from wlora_dist.planning.memory_plan import PlanInput
from wlora_dist.planning.traffic import StepTraffic, moved, step_transfers, traffic_of

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "traffic_worker.py"
WORLD, GPUS_PER_NODE = 4, 2
HIDDEN, INTERMEDIATE, VOCAB = 64, 128, 259
SELECTION_STEPS, MAX_STEPS, MEASURED = 3, 6, (2, 6)
# tag -> (decoder layers, backend, extra distributed settings, base, gradient checkpointing,
# micro-batches, ZeRO persistence threshold). ZeRO-3 runs on 24 layers: what it keeps
# gathered around the last layer (and re-gathers ahead of time) is a layer or two, a few
# per cent at that depth; FSDP2 is exact at any depth.
CASES: dict[str, tuple[int, str, dict, str, bool, int, int]] = {
    "fsdp2 ckpt accum2": (8, "fsdp2", {}, "none", True, 2, 0),
    "hsdp 2x2": (8, "fsdp2", {"fsdp": {"shard_size": 2}}, "none", False, 1, 0),
    "hsdp 2x2 int8": (8, "fsdp2", {"fsdp": {"shard_size": 2}}, "int8", False, 1, 0),
    "zero3": (24, "zero3", {}, "none", False, 1, 0),
    "zero3 ckpt": (24, "zero3", {}, "none", True, 1, 0),
    "zero3 hpz2 accum2": (24, "zero3", {"hpz_partition_size": 2}, "none", False, 2, 0),
    "zero3 persistent accum2": (8, "zero3", {}, "none", False, 2, 100_000),
}
# What tests/test_traffic.py runs (every feature above, in fewer launches' worth of steps).
TEST_CASES = ["fsdp2 ckpt accum2", "hsdp 2x2 int8", "zero3 ckpt", "zero3 hpz2 accum2", "zero3 persistent accum2"]


def write_model(root: Path, layers: int) -> Path:
    from transformers import LlamaForCausalLM

    from wlora_dist.model.tiny import tiny_llama_config

    folder = root / f"model-{layers}"
    if not (folder / "model.safetensors").is_file():
        config = tiny_llama_config(VOCAB, HIDDEN, layers)
        config.intermediate_size = INTERMEDIATE
        # The tiny models' wide init (0.3) overflows a backward through 24 layers now and then.
        config.initializer_range = 0.02
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def spec(root: Path, out: Path, tag: str) -> dict:
    layers, backend, extra, base, ckpt, micro, persistence = CASES[tag]
    model = write_model(root, layers)
    run = out / tag.replace(" ", "-")
    dist: dict = {"backend": backend, "timeout_minutes": 10, **{k: v for k, v in extra.items() if k == "fsdp"}}
    if backend == "zero3":
        ds_json = out / f"ds-{persistence}.json"
        ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": persistence}}))
        zero = {"stage": 3, "config_file": str(ds_json), **{k: v for k, v in extra.items() if k != "fsdp"}}
        dist = {"backend": "zero", "zero": zero, "timeout_minutes": 10}
    cfg = {
        "model": {"path": str(model), "quantization": base, "gradient_checkpointing": ckpt},
        "adapter": {"lora_rank": 2, "lora_alpha": 4},
        "selection": {"method": "topk", "k": 5, "steps": SELECTION_STEPS},
        "data": {"train": ["<random tokens>"], "seq_len": 4},
        "train": {"max_steps": MAX_STEPS, "micro_batch_size": 1, "grad_accum_steps": micro},
        "log": {"trackers": [], "progress_bar": False},
        "output": {"dir": str(run), "reports": False},
        "checkpoint": {"save_on_signal": False},
        "distributed": dist,
    }
    return {"tag": tag, "vocab": VOCAB, "cfg": cfg, "measure": list(MEASURED)}


def measured_traffic(records: list[dict], rank: int) -> StepTraffic:
    """What rank ``rank`` moved, from its counted collectives (the model's byte rule);
    DeepSpeed's broadcasts under "broadcast", which the model leaves out (see its docstring)."""
    out = StepTraffic()
    for r in records:
        inside, across = moved(r["kind"], r["ranks"], rank, GPUS_PER_NODE, r["nbytes"])
        out.add(r["kind"], inside, across)
    return out


def _without_broadcasts(t: StepTraffic) -> list[float]:
    return [
        sum(v for k, v in t.inside.items() if k != "broadcast"),
        sum(v for k, v in t.across.items() if k != "broadcast"),
    ]


def planned_traffic(spec_: dict, kept: list[tuple[int, str]], selection: bool) -> StepTraffic:
    from wlora_dist.config import config_from_dict
    from wlora_dist.planning.memory_plan import sites
    from wlora_dist.planning.sources import run_plan_input, shape_from
    from wlora_dist.resolved import resolve_run

    cfg = config_from_dict(spec_["cfg"])
    run = resolve_run(cfg, resume=False)
    inp: PlanInput = run_plan_input(run.cfg, shape_from(cfg.model.path), WORLD, run.spec, on_gpu=False, kept=kept)
    persistence = CASES[spec_["tag"]][6]
    chosen = sites(inp) if selection else [tuple(k) for k in kept]
    transfers = step_transfers(inp, chosen, selection, cfg.train.grad_accum_steps, persistence)  # type: ignore[arg-type]
    return traffic_of(transfers, inp, GPUS_PER_NODE)


def run_cases(root: Path, tags: list[str], launch=None) -> list[dict]:  # type: ignore[no-untyped-def]
    """One launch of ``WORLD`` ranks over ``tags``: per case and measured step, rank 0's
    planned and measured bytes inside and across nodes."""
    from benchmarks.step_memory import launch as torchrun

    specs = [spec(root, root, tag) for tag in tags]
    first = Path(specs[0]["cfg"]["output"]["dir"])
    first.mkdir(parents=True, exist_ok=True)
    (root / "specs.json").write_text(json.dumps(specs))
    (launch or torchrun)(WORKER, root / "specs.json", WORLD)
    ranks = [json.loads((first / f"traffic-rank{r}.json").read_text()) for r in range(WORLD)]
    rows = []
    for i, s in enumerate(specs):
        kept = [tuple(k) for k in ranks[0][i]["kept"]]
        for step in MEASURED:
            plan = planned_traffic(s, kept, selection=step <= SELECTION_STEPS)  # type: ignore[arg-type]
            per_rank = [measured_traffic(ranks[r][i]["steps"][str(step)], r) for r in range(WORLD)]
            rows.append(
                {
                    "case": s["tag"],
                    "step": step,
                    "phase": "selection" if step <= SELECTION_STEPS else "after prune",
                    "planned": [plan.inside_total, plan.across_total],
                    "measured": [_without_broadcasts(m) for m in per_rank],
                    "broadcast": per_rank[0].inside.get("broadcast", 0) + per_rank[0].across.get("broadcast", 0),
                }
            )
    return rows


def format_rows(rows: list[dict]) -> str:
    out = [
        "| case | step | planned inside / across (KiB) | measured, rank 0 (KiB) | worst rank's error | "
        "DeepSpeed broadcasts, rank 0 (KiB, not counted) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["planned"]
        m = r["measured"][0]
        err = max(
            abs(x - y) / y if y else abs(x) for ranks in r["measured"] for x, y in zip(p, ranks, strict=True) if x or y
        )
        out.append(
            f"| {r['case']} | {r['step']} ({r['phase']}) | {p[0] / 1024:,.0f} / {p[1] / 1024:,.0f} | "
            f"{m[0] / 1024:,.0f} / {m[1] / 1024:,.0f} | {100 * err:.1f}% | {r['broadcast'] / 1024:,.1f} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- the planned table


def planned_table(gpus_per_node: int = 8) -> str:
    """Per rank per step, GB inside / across nodes, selection -> after the prune event, for
    the presets on 1, 2 and 4 nodes (NF4 base, LoRA r=16 on every linear, K=32)."""
    from wlora_dist.planning.search import node_layouts
    from wlora_dist.planning.sources import shape_from
    from wlora_dist.planning.traffic import plan_traffic

    gb = 1e9
    out = [
        f"| model | nodes x {gpus_per_node} | layout | base per rank (GiB) | inside a node, GB | across nodes, GB |",
        "|---|---|---|---|---|---|",
    ]
    for model in ("llama3-8b", "llama3-70b", "llama3.1-405b"):
        for nodes in (1, 2, 4):
            inp = PlanInput(shape_from(model), world_size=nodes * gpus_per_node, base="nf4", k=32)
            for name, p in node_layouts(inp, gpus_per_node):
                t = plan_traffic(p.inp, gpus_per_node)
                out.append(
                    f"| {model} | {nodes} | {name} | {p.before.base / 2**30:.1f} | "
                    f"{t.before.inside_total / gb:.2f} -> {t.after.inside_total / gb:.2f} | "
                    f"{t.before.across_total / gb:.2f} -> {t.after.across_total / gb:.2f} |"
                )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="print the planned table for the presets only")
    ap.add_argument("--out", type=Path, default=None, help="folder for the model and results (default: a temp folder)")
    args = ap.parse_args()
    if args.table:
        print(planned_table())
        return
    root = args.out or Path(tempfile.mkdtemp(prefix="traffic-"))
    rows = run_cases(root, list(CASES))
    print(format_rows(rows))
    (root / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
