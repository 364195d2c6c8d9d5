"""The memory planner against measurement: run the real training step on a random-init
Llama (harness.py) and compare each rank's measured peak with ``memory_plan.plan``.

World size > 1 is simulated in one process with torch's fake process group (collectives
are no-ops, so values are meaningless, but every shard, all-gather buffer and activation
has its real size): what one rank of an N-rank FSDP2 job allocates.

    python -m benchmarks.plan_check '[{"world_size": 4, "backend": "fsdp2"}]'
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch

from benchmarks.harness import Harness, bench_config, fake_world, kept_layer_kinds, random_llama
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.planning.memory_plan import PlanInput, plan
from wlora_dist.planning.shapes import LINEARS, ModelShape

CHECK_SHAPE = ModelShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=4096)


def run_case(case: dict) -> dict:
    """``case``: world_size, backend (replicated | fsdp2), micro_batch, seq_len,
    checkpointing, targets, rank, k, selection_steps. Returns measured and planned peaks
    (bytes) before and after the prune event."""
    shape = ModelShape(**case.get("shape", asdict(CHECK_SHAPE)))
    ws = int(case.get("world_size", 1))
    backend = case.get("backend", "replicated")
    targets = list(case.get("targets", LINEARS))
    mb, seq = int(case.get("micro_batch", 2)), int(case.get("seq_len", 256))
    ckpt = bool(case.get("checkpointing", False))
    int8 = bool(case.get("int8", False))
    loss_shards = int(case.get("loss_shards", 0))
    layers = case.get("layers")  # decoder layers with adapters (None = all)
    every = int(case.get("checkpoint_every", 1))
    rank, k, steps = int(case.get("rank", 8)), int(case.get("k", 4)), int(case.get("selection_steps", 2))
    with fake_world(ws):
        env = DistEnv(0, 0, ws, torch.device("cpu"))
        cfg = bench_config(
            {
                "adapter.lora_rank": rank,
                "adapter.target_modules": targets,
                "adapter.layers": layers,
                "selection.k": k,
                "selection.steps": steps,
                "train.max_steps": steps + 4,
                "train.micro_batch_size": mb,
                "data.seq_len": seq,
                "model.gradient_checkpointing": ckpt,
                "model.checkpoint_every_n_layers": every,
                "train.loss_shards": loss_shards,
                "distributed.backend": backend,
            }
        )
        model = random_llama(
            shape, env.device, torch.float32, quant="int8" if int8 else "none", meta=backend == "fsdp2"
        )
        h = Harness.build(cfg, env, model)
        for _ in range(steps - 1):
            h.run_step()  # the first creates AdamW's state
        before = h.measured_step()  # step T - 1 < T: selection
        h.run_step()  # step T: the prune event
        after = h.measured_step()
        kept = tuple(kept_layer_kinds(h))
        del h
    p = plan(
        PlanInput(
            shape,
            ws,
            BackendSpec.parse(backend),
            base="int8" if int8 else "fp32",
            compute="fp32",
            lora_rank=rank,
            targets=tuple(targets),
            lora_layers=tuple(layers) if layers is not None else None,
            k=k,
            micro_batch=mb,
            seq_len=seq,
            activation_checkpointing=ckpt,
            checkpoint_every=every,
            loss_shards=loss_shards,
            kept=kept,
        )
    )
    return {
        "case": case,
        "measured_before": before["peak_bytes"],
        "planned_before": p.before.total,
        "measured_after": after["peak_bytes"],
        "planned_after": p.after.total,
        "resident_before": before["resident_bytes"],
        "planned_static_before": p.before.base + p.before.adapters + p.before.optimizer,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cases = json.loads(argv[0]) if argv else [{}]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [run_case(c) for c in cases]
    for r in results:
        keys = ("measured_before", "planned_before", "measured_after", "planned_after")
        mb, pb, ma, pa = (r[k] / 2**20 for k in keys)
        print(
            f"{json.dumps(r['case'])}: selection measured {mb:.1f} MiB planned {pb:.1f} ({pb / mb - 1:+.1%}); "
            f"after prune measured {ma:.1f} planned {pa:.1f} ({pa / ma - 1:+.1%})",
            file=sys.stderr,
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
