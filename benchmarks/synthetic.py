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
import math
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
    effects: list[float] | None = None  # per planted delta (true_set order): KL of the teacher without it

    @property
    def effect_recall(self) -> float:
        """The share of the planted deltas' effect on the output that the kept set covers:
        a missed delta that barely moves the teacher costs little here."""
        assert self.effects is not None
        total = sum(self.effects)
        found = sum(e for i, e in zip(self.true_set, self.effects, strict=True) if i in self.kept_set)
        return found / total if total > 0 else 1.0


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
    layers: int | None = None,
    delta_rank: int = 2,
    scales: list[float] | None = None,
    correction: str = "none",
    effects: bool = False,
) -> RecoveryResult:
    """Run the selection phase on the teacher/student task; return the recall of S.

    ``plant``: see _plant. ``schedule``: constant (the selection phase at the peak LR, the
    authors' choice) or main (lr and lr_w scaled by a warmup over T/2 steps then cosine
    decay over a 5T-step run, as one schedule over the whole run gives the selection
    phase). ``gate_warmup``: the gates stay still for this many first steps while A and B
    train (a candidate fix of the layer bias). ``device`` (default CPU) and ``autocast``
    (bf16, as the trainer runs on a GPU) check that the selection survives reduced
    precision; the data are drawn on the CPU, so every device sees the same batches.

    The wide study's shapes: ``layers`` (default 2, 4 for plant "deep"), ``delta_rank`` of
    each planted delta, ``scales`` (one per planted delta; overrides the plant's), and
    ``correction`` of the layer bias: none, adapter_norm (each gate's gradient divided by
    its adapter's ||B A||, rescaled by their mean) or layer_quota (the projection keeps at
    most ceil(2K / layers) adapters of a layer). ``effects``: also measure each planted
    delta's own effect on the teacher's output (on batches of their own, so the training
    stream is unchanged)."""
    device = device or torch.device("cpu")
    depth = layers if layers is not None else 4 if plant == "deep" else 2
    base = make_model(vocab, hidden=32, layers=depth, seed=seed)
    teacher = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher.to(device)
    wl = WeightLoRA.attach(base.to(device), AdapterConfig(lora_rank=4, lora_alpha=8.0))
    true_set, plant_scales = _plant(plant, wl.n, [s.kind for s in wl.sites], k, gen)
    scales = plant_scales if scales is None else scales
    deltas = {}
    with torch.no_grad():
        for i, scale in zip(true_set, scales, strict=True):
            weight = teacher.get_submodule(wl.sites[i].name).weight  # (out, in)
            u = torch.randn(weight.shape[0], delta_rank, generator=gen).to(device)
            v = torch.randn(weight.shape[1], delta_rank, generator=gen).to(device)
            delta = (u @ v.T) / (weight.shape[1] * delta_rank / 2) ** 0.5  # rank-2: as before
            deltas[i] = scale * delta * weight.std()
            weight += deltas[i]
    effect = _effects(teacher, wl, deltas, vocab, seed, device) if effects else None
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
            grad = _corrected(wl, wl.gates.grad, correction)
            project_now, prune = is_projection_step(step, sel), is_prune_step(step, sel)
            if correction == "layer_quota":
                result = gate_step(wl.gates, grad, lr_w * mult, sel, False)
                new = result.gates
                if prune or (project_now and result.grad_norm > sel.grad_eps):
                    new = _quota_topk(new, [s.layer for s in wl.sites], k, math.ceil(2 * k / depth))
            else:
                new = gate_step(wl.gates, grad, lr_w * mult, sel, project_now, prune).gates
            with torch.no_grad():
                wl.gates.copy_(new)
        wl.gates.grad = None
    kept = sorted(torch.nonzero(wl.gates.detach()).flatten().tolist())
    sites = [(s.layer, s.kind) for s in wl.sites]
    recall = len(set(kept) & set(true_set)) / k
    return RecoveryResult(recall, true_set, kept, float(loss.detach()), sites, effect)


@torch.no_grad()
def _effects(teacher, wl: WeightLoRA, deltas: dict, vocab: int, seed: int, device: torch.device) -> list[float]:
    """KL(teacher || teacher without delta i) per planted delta, on 4 batches of random
    tokens drawn from a generator of their own."""
    gen = torch.Generator().manual_seed(555_555 + seed)
    xs = [torch.randint(0, vocab, (8, 32), generator=gen).to(device) for _ in range(4)]
    full = [F.log_softmax(teacher(input_ids=x).logits.float(), -1) for x in xs]
    out = []
    for i, delta in deltas.items():
        weight = teacher.get_submodule(wl.sites[i].name).weight
        weight -= delta
        kl = 0.0
        for x, target in zip(xs, full, strict=True):
            pred = F.log_softmax(teacher(input_ids=x).logits.float(), -1)
            kl += float(F.kl_div(pred, target, log_target=True, reduction="batchmean")) / x.shape[1]
        weight += delta
        out.append(kl / len(xs))
    return out


def _corrected(wl: WeightLoRA, grad: torch.Tensor, correction: str) -> torch.Tensor:
    """The gate gradient with the layer-bias correction applied (see selection_recovery)."""
    if correction != "adapter_norm":
        return grad
    norms = []
    for site in wl.sites:
        a, b = wl.adapter_params(site)  # A (r, in), B (out, r)
        norms.append(torch.sqrt(torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0)).detach())
    scale = torch.stack(norms)
    if float(scale.max()) == 0:
        return grad
    scale = scale.clamp_min(1e-8 * float(scale.max()))
    return grad / scale * scale.mean()


def _quota_topk(w: torch.Tensor, layer_of: list[int | None], k: int, quota: int) -> torch.Tensor:
    """Top-K by signed value with at most ``quota`` adapters per decoder layer."""
    order = sorted(range(len(w)), key=lambda i: (-float(w[i]), i))
    kept: list[int] = []
    per_layer: dict[int | None, int] = {}
    for i in order:
        if per_layer.get(layer_of[i], 0) < quota:
            kept.append(i)
            per_layer[layer_of[i]] = per_layer.get(layer_of[i], 0) + 1
        if len(kept) == k:
            break
    out = torch.zeros_like(w)
    out[kept] = w[kept]
    return out


def study(seeds: int, steps: int = 40) -> dict:
    """Recall (mean and spread over seeds) per plant for every combination of P in
    {1, T/4, T/2, T}, signed / magnitude top-K and constant / main selection LR; then the
    layer bias (where misses and spurious picks fall) and the gate warm-up candidate."""
    rows = []
    for p, topk_by, schedule in itertools.product(
        (1, steps // 4, steps // 2, steps), ("signed", "magnitude"), ("constant", "main")
    ):
        row: dict = {"P": p, "topk_by": topk_by, "schedule": schedule}
        for plant in PLANTS:
            recalls = [
                selection_recovery(s, p, steps, topk_by=topk_by, plant=plant, schedule=schedule).recall
                for s in range(seeds)
            ]
            row[plant] = (statistics.mean(recalls), statistics.stdev(recalls))
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


# The wide study: families of shapes other than the study's own (depth 2-8, K 2-16, delta
# rank 1 or 4, equal or spread delta sizes) and the candidate defaults compared on them.
CANDIDATES: dict[str, dict] = {
    "P=T/4 (four projections)": {"every": 4},
    "P=T/2 (two projections)": {"every": 2},
    "once at T": {"every": 1},
    "P=T/4 + adapter_norm": {"every": 4, "correction": "adapter_norm"},
    "once at T + adapter_norm": {"every": 1, "correction": "adapter_norm"},
    "once at T + layer_quota": {"every": 1, "correction": "layer_quota"},
}


@dataclass(frozen=True)
class Shape:
    layers: int
    k: int
    delta_rank: int
    sizes: str  # equal (every delta 1) or spread (log-uniform 0.5-4, drawn per seed)

    @property
    def name(self) -> str:
        return f"L{self.layers} K{self.k} r{self.delta_rank} {self.sizes}"

    def families(self) -> list[str]:
        depth = "depth 2" if self.layers == 2 else "depth 4" if self.layers == 4 else "depth 8"
        return [depth, f"K {self.k}", f"delta rank {self.delta_rank}", f"sizes {self.sizes}"]


def wide_shapes() -> list[Shape]:
    """K up to n/4 of each depth (n = 7 x layers): 2 layers K 2-4, 4 layers 2-8, 8 layers 2-16."""
    ks = {2: (2, 4), 4: (2, 4, 8), 8: (2, 4, 8, 16)}
    return [Shape(d, k, r, z) for d in (2, 4, 8) for k in ks[d] for r in (1, 4) for z in ("equal", "spread")]


def wide_recall(shape: Shape, candidate: str, seed: int, steps: int = 40) -> RecoveryResult:
    c = CANDIDATES[candidate]
    gen = torch.Generator().manual_seed(7919 * seed + 1)
    scales = None
    if shape.sizes == "spread":
        scales = (0.5 * 8.0 ** torch.rand(shape.k, generator=gen)).tolist()
    every = steps // c["every"] if c["every"] > 1 else 0
    return selection_recovery(
        seed,
        every,
        steps,
        k=shape.k,
        layers=shape.layers,
        delta_rank=shape.delta_rank,
        scales=scales if scales is not None else [1.0] * shape.k,
        correction=c.get("correction", "none"),
        effects=True,
    )


def wide_study(
    seeds: int, candidates: list[str], steps: int = 40, progress=None, shapes: list[Shape] | None = None
) -> dict:
    """Recall per shape and per family of shapes for every candidate default."""
    shapes = shapes or wide_shapes()
    per_shape: dict[str, dict[str, list[float]]] = {c: {} for c in candidates}
    weighted: dict[str, dict[str, list[float]]] = {c: {} for c in candidates}
    for cand in candidates:
        for shape in shapes:
            runs = [wide_recall(shape, cand, s, steps) for s in range(seeds)]
            per_shape[cand][shape.name] = [r.recall for r in runs]
            weighted[cand][shape.name] = [r.effect_recall for r in runs]
            if progress:
                progress()
    out: dict = {"seeds": seeds, "steps": steps, "candidates": {}}
    for cand in candidates:
        fam: dict[str, list[float]] = {}
        fam_w: dict[str, list[float]] = {}
        for shape in shapes:
            for f in shape.families():
                fam.setdefault(f, []).extend(per_shape[cand][shape.name])
                fam_w.setdefault(f, []).extend(weighted[cand][shape.name])
        means = {k: statistics.mean(v) for k, v in per_shape[cand].items()}
        worst = min(means, key=lambda k: means[k])
        out["candidates"][cand] = {
            "mean": statistics.mean(means.values()),
            "families": {f: statistics.mean(v) for f, v in fam.items()},
            "worst_shape": [worst, means[worst]],
            "shapes": per_shape[cand],
            "effect_mean": statistics.mean(statistics.mean(v) for v in weighted[cand].values()),
            "effect_families": {f: statistics.mean(v) for f, v in fam_w.items()},
            "effect_shapes": weighted[cand],
        }
    return out


def wide_markdown(res: dict) -> str:
    seen = next(iter(res["candidates"].values()))["families"]
    order = ["depth 2", "depth 4", "depth 8", "K 2", "K 4", "K 8", "K 16", "delta rank 1", "delta rank 4"]
    fams = [f for f in [*order, "sizes equal", "sizes spread"] if f in seen]
    lines = [
        f"Recall per family of shapes (mean over its shapes and {res['seeds']} seeds, T = {res['steps']}); "
        "worst shape = lowest mean over seeds.",
        "",
        "| candidate | " + " | ".join(fams) + " | mean | worst shape |",
        "|---|" + "---|" * (len(fams) + 2),
    ]
    for cand, r in res["candidates"].items():
        cells = [f"{r['families'][f]:.2f}" for f in fams]
        w = r["worst_shape"]
        lines.append(f"| {cand} | " + " | ".join(cells) + f" | {r['mean']:.2f} | {w[0]}: {w[1]:.2f} |")
    lines += [
        "",
        "Share of the planted deltas' effect on the teacher's output that the kept set covers "
        "(each delta weighted by KL(teacher || teacher without it)):",
        "",
        "| candidate | " + " | ".join(fams) + " | mean |",
        "|---|" + "---|" * (len(fams) + 1),
    ]
    for cand, r in res["candidates"].items():
        cells = [f"{r['effect_families'][f]:.2f}" for f in fams]
        lines.append(f"| {cand} | " + " | ".join(cells) + f" | {r['effect_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def _where(layer: int | None, last: int) -> str:
    return "first layer" if layer == 0 else "last layer" if layer == last else "other"


def study_markdown(res: dict) -> str:
    t = res["steps"]
    lines = [
        f"Recall of the planted set, mean ± sample s.d. over {res['seeds']} seeds, T = {t}, K = 4 "
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
    ap.add_argument("--wide", metavar="OUT.json", help="the wide study: candidate defaults on many shapes")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES), metavar="C")
    args = ap.parse_args(argv)
    if args.wide:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(args.candidates) * len(wide_shapes()), desc="wide study", disable=None)
        res = wide_study(args.seeds, args.candidates, args.steps, progress=lambda: bar.update(1))
        bar.close()
        with open(args.wide, "w") as f:
            json.dump(res, f, indent=1)
        print(wide_markdown(res))
        return
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
