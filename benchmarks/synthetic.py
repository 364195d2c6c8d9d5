"""A task with a known answer: does the selection find the modules that matter?

A teacher is the base model plus low-rank deltas on a known subset S of its linears. A
student (the same base with WeightLoRA on every linear) is trained to match the
teacher's next-token distribution on random tokens; the selection phase then keeps K =
|S| adapters. Recall = |kept ∩ S| / |S|. Chance level is K / n.

    python -m benchmarks.synthetic --seeds 5 --project-every 1 40
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wlora_dist.config import AdapterConfig, SelectionConfig
from wlora_dist.method.gates import gate_step
from wlora_dist.method.schedule import is_projection_step, is_prune_step
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.tiny import make_model


@dataclass(frozen=True)
class RecoveryResult:
    recall: float
    true_set: list[int]
    kept_set: list[int]
    final_loss: float


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
) -> RecoveryResult:
    """Run the selection phase on the teacher/student task; return the recall of S.
    ``device`` (default CPU) and ``autocast`` (bf16 autocast, as the trainer runs on a GPU)
    check that the selection survives reduced precision; the data are drawn on the CPU, so
    every device sees the same batches."""
    device = device or torch.device("cpu")
    base = make_model(vocab, hidden=32, layers=2, seed=seed)
    teacher = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher.to(device)
    wl = WeightLoRA.attach(base.to(device), AdapterConfig(lora_rank=4, lora_alpha=8.0))
    true_set = sorted(torch.randperm(wl.n, generator=gen)[:k].tolist())
    with torch.no_grad():
        for i in true_set:
            weight = teacher.get_submodule(wl.sites[i].name).weight  # (out, in)
            u = torch.randn(weight.shape[0], 2, generator=gen).to(device)
            v = torch.randn(weight.shape[1], 2, generator=gen).to(device)
            weight += (u @ v.T) / weight.shape[1] ** 0.5 * weight.std()  # rank-2 delta
    sel = SelectionConfig(method="topk", k=k, lr_w=lr_w, steps=steps, project_every=project_every, topk_by=topk_by)
    opt = torch.optim.AdamW(wl.trainable_parameters(), lr=lr)
    loss = torch.zeros(())
    for step in range(1, steps + 1):
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
        result = gate_step(wl.gates, wl.gates.grad, lr_w, sel, is_projection_step(step, sel), is_prune_step(step, sel))
        with torch.no_grad():
            wl.gates.copy_(result.gates)
        wl.gates.grad = None
    kept = sorted(torch.nonzero(wl.gates.detach()).flatten().tolist())
    return RecoveryResult(len(set(kept) & set(true_set)) / k, true_set, kept, float(loss.detach()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="selection phase T")
    ap.add_argument("--project-every", type=int, nargs="+", default=[1, 40], help="P values to compare")
    ap.add_argument("--topk-by", default="signed", choices=["signed", "magnitude"])
    args = ap.parse_args(argv)
    print("P  recall per seed                 mean  (chance 4/14 = 0.29)")
    for p in args.project_every:
        recalls = [selection_recovery(s, p, args.steps, topk_by=args.topk_by).recall for s in range(args.seeds)]
        print(f"{p:<3}{recalls!s:<32}{sum(recalls) / len(recalls):.2f}")


if __name__ == "__main__":
    main()
