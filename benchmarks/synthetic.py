"""A task with a known answer: does the selection find the modules that matter?

A teacher is the base model plus low-rank deltas on a known subset S of its linears. A
student (the same base with WeightLoRA on every linear) is trained to match the
teacher's next-token distribution on random tokens; the selection phase then keeps K =
|S| adapters. Recall = |kept ∩ S| / |S|. Chance level is K / n.

    python -m benchmarks.synthetic --seeds 5 --project-every 1 40
    python -m benchmarks.synthetic --seeds 5 --study study.json   # docs/method.md's table
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wlora_dist.config import AdapterConfig, OptimConfig, SelectionConfig
from wlora_dist.method.gates import gate_step
from wlora_dist.method.schedule import is_projection_step, is_prune_step, lr_multiplier
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.tiny import make_model


@dataclass(frozen=True)
class RecoveryResult:
    recall: float
    true_set: list[int]
    kept_set: list[int]
    final_loss: float
    sites: list[tuple[int | None, str]]  # (layer, kind) of every adapter, index order


PLANTS = ("all", "mlp", "unequal", "deep")


def _plant(plant: str, n_sites: int, kinds: list[str], k: int, gen: torch.Generator) -> tuple[list[int], list[float]]:
    """The planted set S and each delta's scale: all (any of the linears, equal deltas),
    mlp (gate / up / down only), unequal (deltas scaled 0.5, 1, 2, 4), deep (all, on a
    4-layer model)."""
    pool = [i for i in range(n_sites) if plant != "mlp" or kinds[i] in ("gate_proj", "up_proj", "down_proj")]
    chosen = sorted(pool[j] for j in torch.randperm(len(pool), generator=gen)[:k].tolist())
    scales = [0.5 * 2.0**j for j in range(k)] if plant == "unequal" else [1.0] * k
    return chosen, scales


def selection_recovery(
    seed: int,
    project_every: int,
    steps: int = 40,
    k: int = 4,
    lr: float = 1e-2,
    lr_w: float = 5.0,
    topk_by: str = "signed",
    vocab: int = 259,
    device: torch.device | None = None,
    autocast: bool = False,
    plant: str = "all",
    schedule: str = "constant",
    gate_warmup: int = 0,
) -> RecoveryResult:
    """Run the selection phase on the teacher/student task; return the recall of S.

    ``plant``: see _plant. ``schedule``: constant (the selection phase at the peak LR, the
    authors' choice) or main (lr and lr_w scaled by a warmup over T/2 steps then cosine
    decay over a 5T-step run, as one schedule over the whole run gives the selection
    phase). ``gate_warmup``: the gates stay still for this many first steps while A and B
    train (a candidate fix of the layer bias). ``device`` (default CPU) and ``autocast``
    (bf16, as the trainer runs on a GPU) check that the selection survives reduced
    precision; the data are drawn on the CPU, so every device sees the same batches."""
    device = device or torch.device("cpu")
    base = make_model(vocab, hidden=32, layers=4 if plant == "deep" else 2, seed=seed)
    teacher = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher.to(device)
    wl = WeightLoRA.attach(base.to(device), AdapterConfig(lora_rank=4, lora_alpha=8.0))
    true_set, scales = _plant(plant, wl.n, [s.kind for s in wl.sites], k, gen)
    with torch.no_grad():
        for i, scale in zip(true_set, scales, strict=True):
            weight = teacher.get_submodule(wl.sites[i].name).weight  # (out, in)
            u = torch.randn(weight.shape[0], 2, generator=gen).to(device)
            v = torch.randn(weight.shape[1], 2, generator=gen).to(device)
            weight += scale * (u @ v.T) / weight.shape[1] ** 0.5 * weight.std()  # rank-2 delta
    sel = SelectionConfig(method="topk", k=k, lr_w=lr_w, steps=steps, project_every=project_every, topk_by=topk_by)
    optim = OptimConfig(lr=lr, warmup_steps=max(1, steps // 2), schedule="cosine")
    opt = torch.optim.AdamW(wl.trainable_parameters(), lr=lr)
    loss = torch.zeros(())
    for step in range(1, steps + 1):
        mult = 1.0 if schedule == "constant" else lr_multiplier(step, optim, 5 * steps)
        for group in opt.param_groups:
            group["lr"] = lr * mult
        x = torch.randint(0, vocab, (8, 32), generator=gen).to(device)  # (B, T)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=x).logits.float(), -1)  # (B, T, V)
            pred = F.log_softmax(wl.peft_model(input_ids=x).logits.float(), -1)
        loss = F.kl_div(pred, target, log_target=True, reduction="batchmean") / x.shape[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert wl.gates.grad is not None
        if step > gate_warmup or step == steps:
            result = gate_step(
                wl.gates, wl.gates.grad, lr_w * mult, sel, is_projection_step(step, sel), is_prune_step(step, sel)
            )
            with torch.no_grad():
                wl.gates.copy_(result.gates)
        wl.gates.grad = None
    kept = sorted(torch.nonzero(wl.gates.detach()).flatten().tolist())
    sites = [(s.layer, s.kind) for s in wl.sites]
    return RecoveryResult(len(set(kept) & set(true_set)) / k, true_set, kept, float(loss.detach()), sites)


def study(seeds: int, steps: int = 40) -> dict:
    """Recall (mean and spread over seeds) per plant for every combination of P in
    {1, T/4, T}, signed / magnitude top-K and constant / main selection LR; then the
    layer bias (where misses and spurious picks fall) and the gate warm-up candidate."""
    rows = []
    for p, topk_by, schedule in itertools.product(
        (1, steps // 4, steps), ("signed", "magnitude"), ("constant", "main")
    ):
        row: dict = {"P": p, "topk_by": topk_by, "schedule": schedule}
        for plant in PLANTS:
            recalls = [
                selection_recovery(s, p, steps, topk_by=topk_by, plant=plant, schedule=schedule).recall
                for s in range(seeds)
            ]
            row[plant] = (statistics.mean(recalls), statistics.pstdev(recalls))
        rows.append(row)
    bias: dict[str, dict[str, int]] = {}
    warm = {}
    for p in (1, steps):
        misses: dict[str, int] = {"first layer": 0, "last layer": 0, "other": 0}
        spurious = dict.fromkeys(misses, 0)
        for plant in ("all", "deep"):
            for s in range(seeds):
                r = selection_recovery(s, p, steps, plant=plant)
                last = max(layer for layer, _ in r.sites if layer is not None)
                for i in set(r.true_set) - set(r.kept_set):
                    misses[_where(r.sites[i][0], last)] += 1
                for i in set(r.kept_set) - set(r.true_set):
                    spurious[_where(r.sites[i][0], last)] += 1
        bias[f"P={p} misses"], bias[f"P={p} spurious"] = misses, spurious
        warm[f"P={p}"] = {
            plant: statistics.mean(
                selection_recovery(s, p, steps, plant=plant, gate_warmup=steps // 4).recall for s in range(seeds)
            )
            for plant in PLANTS
        }
    return {"seeds": seeds, "steps": steps, "rows": rows, "layer_bias": bias, "gate_warmup": warm}


def _where(layer: int | None, last: int) -> str:
    return "first layer" if layer == 0 else "last layer" if layer == last else "other"


def study_markdown(res: dict) -> str:
    t = res["steps"]
    lines = [
        f"Recall of the planted set, mean ± spread over {res['seeds']} seeds, T = {t}, K = 4 "
        "(chance: 4/14 = 0.29 on 2 layers, 4/28 = 0.14 on 4).",
        "",
        "| P | top-K by | selection LR | " + " | ".join(PLANTS) + " | mean |",
        "|---|---|---|" + "---|" * (len(PLANTS) + 1),
    ]
    for r in res["rows"]:
        cells = [f"{r[p][0]:.2f} ± {r[p][1]:.2f}" for p in PLANTS]
        mean = statistics.mean(r[p][0] for p in PLANTS)
        lines.append(f"| {r['P']} | {r['topk_by']} | {r['schedule']} | " + " | ".join(cells) + f" | {mean:.2f} |")
    lines += ["", "Where the misses and the spurious picks fall (plants all + deep, signed, constant LR):", ""]
    lines += [f"- {k}: {v}" for k, v in res["layer_bias"].items()]
    lines += ["", f"Gate warm-up (gates still for the first T/4 = {t // 4} steps), recall per plant:", ""]
    lines += [f"- {k}: " + ", ".join(f"{p} {v:.2f}" for p, v in row.items()) for k, row in res["gate_warmup"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="selection phase T")
    ap.add_argument("--project-every", type=int, nargs="+", default=[1, 40], help="P values to compare")
    ap.add_argument("--topk-by", default="signed", choices=["signed", "magnitude"])
    ap.add_argument("--plant", default="all", choices=PLANTS)
    ap.add_argument("--study", metavar="OUT.json", help="the whole study (docs/method.md's table); writes JSON")
    args = ap.parse_args(argv)
    if args.study:
        res = study(args.seeds, args.steps)
        with open(args.study, "w") as f:
            json.dump(res, f, indent=1)
        print(study_markdown(res))
        return
    print("P  recall per seed                 mean  (chance 4/14 = 0.29)")
    for p in args.project_every:
        recalls = [
            selection_recovery(s, p, args.steps, topk_by=args.topk_by, plant=args.plant).recall
            for s in range(args.seeds)
        ]
        print(f"{p:<3}{recalls!s:<32}{sum(recalls) / len(recalls):.2f}")


if __name__ == "__main__":
    main()
