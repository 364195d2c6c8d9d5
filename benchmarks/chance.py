"""Does the selection beat chance? WeightLoRA on a pretrained model and real text, at equal
trainable parameters.

A small Llama (benchmarks/real_text/pretrain.py: 8 layers, n = 56 linears) is pretrained
here on the Python standard library's docstrings; the task is another corpus: causal
language modelling on the first paragraphs of the docstrings of numpy, pandas, torch and
transformers (a fifth of each library's files held out). Every method fine-tunes the same
model on the same batches with the project's trainer (one process, in this process) and
is scored on every held-out token: its loss, and next-token top-1 accuracy. (For a task
scored by exact match on a real pretrained LLM, with each method at its own learning rate,
see benchmarks/real_llm.py.)

    python -m benchmarks.chance                       # the table in docs/method.md, ~25 min on 2 cores
    python -m benchmarks.chance --seeds 1 --methods wlora random --steps 20   # a quick look

Methods (K = n/4 adapters of rank r unless said):
  lora-all        plain LoRA on all n at rank r (4x the parameters; the reference)
  lora-all-equal  plain LoRA on all n at rank r*K/n (equal parameters)
  wlora           WeightLoRA top-K, the project's defaults (two projections, at T/2 and T)
  wlora-four      WeightLoRA top-K, four projections (selection.project_every: ceil(T/4))
  wlora-once      WeightLoRA top-K, one projection at T (selection.project_every: 0)
  wlora-once-norm  as wlora-once, each gate's gradient divided by its adapter's ||B A||
                  (the layer-bias correction of the wide planted study; benchmark-only:
                  a patch of the selector in this process, not a product option)
  wlora-authors   WeightLoRA top-K, selection.preset: authors
  wlora-lm-head   as wlora, with lm_head a candidate too (adapter.include_lm_head: the
                  authors' n = 7L + 1; tells their preset's other choices from this one)
  simplex         WeightLoRA, simplex projection (keeps what it keeps: reported)
  wlora-plus      WeightLoRA+, 2 rounds from rank r/4 on all n (ends at K of rank r)
  random          K adapters drawn at random (seeded), plain LoRA
  habit-qv        q_proj and v_proj of the last K/2 layers, plain LoRA
  habit-mlp       the K MLP linears nearest the output, plain LoRA
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.real_text import corpus
from benchmarks.real_text.pretrain import PretrainSpec, pretrained_model

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = (
    "lora-all",
    "lora-all-equal",
    "wlora",
    "wlora-four",
    "wlora-once",
    "wlora-once-norm",
    "wlora-authors",
    "wlora-lm-head",
    "simplex",
    "wlora-plus",
    "random",
    "habit-qv",
    "habit-mlp",
)


@dataclass(frozen=True)
class Task:
    """The run every method shares."""

    layers: int = 8
    rank: int = 8
    alpha: float = 32.0
    steps: int = 60  # optimizer steps of every run (T of them selection)
    selection_steps: int = 10  # T (the project's default)
    lr: float = 2e-3
    batch: int = 16
    seq_len: int = 128
    rows: int = 600  # docstrings per library (a fifth of the files held out)
    max_files: int | None = None  # of each library read for the task (None: all)

    @property
    def n(self) -> int:
        return 7 * self.layers

    @property
    def k(self) -> int:
        return self.n // 4


def site(layer: int, kind: str) -> str:
    part = "self_attn" if kind in KINDS[:4] else "mlp"
    return f"layers.{layer}.{part}.{kind}"


def method_sections(method: str, task: Task, seed: int) -> dict[str, dict[str, Any]]:
    """The config sections that make ``method`` (over the shared run)."""
    k, n, layers = task.k, task.n, task.layers
    plain = {"selection": {"method": "none"}}
    if method == "lora-all":
        return plain
    if method == "lora-all-equal":
        return {**plain, "adapter": {"lora_rank": max(1, task.rank * k // n)}}
    if method == "wlora":
        return {"selection": {"method": "topk", "k": k}}
    if method == "wlora-four":
        return {"selection": {"method": "topk", "k": k, "project_every": math.ceil(task.selection_steps / 4)}}
    if method == "wlora-lm-head":
        return {"selection": {"method": "topk", "k": k}, "adapter": {"include_lm_head": True}}
    if method in ("wlora-once", "wlora-once-norm"):
        return {"selection": {"method": "topk", "k": k, "project_every": 0}}
    if method == "wlora-authors":
        return {"selection": {"preset": "authors", "method": "topk", "k": k}}
    if method == "simplex":
        return {"selection": {"method": "simplex"}}
    if method == "wlora-plus":
        rounds = round(math.log2(n / k))
        return {"selection": {"method": "topk", "rounds": rounds}, "adapter": {"lora_rank": task.rank >> rounds}}
    every = [site(i, kind) for i in range(layers) for kind in KINDS]
    if method == "random":
        chosen = random.Random(10_000 + seed).sample(every, k)
    elif method == "habit-qv":
        chosen = [site(i, kind) for i in range(layers - k // 2, layers) for kind in ("q_proj", "v_proj")]
    elif method == "habit-mlp":
        chosen = [site(i, kind) for i in reversed(range(layers)) for kind in KINDS[4:]][:k]
    else:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    return {**plain, "adapter": {"target_modules": chosen}}


def make_task_data(task: Task, folder: Path) -> tuple[Path, Path]:
    """train.jsonl / eval.jsonl of the task (text rows; held out by source file)."""
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    if not (train.is_file() and held.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        parts = corpus.task_rows(task.rows, seed=0, max_files=task.max_files)
        for path, part in zip((train, held), parts, strict=True):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
            tmp.rename(path)
    return train, held


@dataclass
class RunResult:
    method: str
    seed: int
    eval_loss: float
    accuracy: float
    kept: int
    trainable: int  # adapter parameters trained after the prune event (at the end)
    selection_seconds: float  # the T selection steps plus the layout change
    seconds: float
    kept_layers: list[int] = field(default_factory=list)


def run_one(
    method: str, seed: int, task: Task, model_dir: Path, data: tuple[Path, Path], eval_ids: torch.Tensor, work: Path
) -> RunResult:
    from wlora_dist.config import config_from_dict
    from wlora_dist.distributed.env import init_distributed
    from wlora_dist.training.trainer import Trainer

    sections = method_sections(method, task, seed)
    cfg: dict[str, dict[str, Any]] = {
        "model": {"path": str(model_dir)},
        "adapter": {"lora_rank": task.rank, "lora_alpha": task.alpha},
        "selection": {"steps": task.selection_steps},
        "optim": {"lr": task.lr, "warmup_steps": 5},
        "data": {
            "train": [str(data[0])],
            "eval": [str(data[1])],
            "seq_len": task.seq_len,
            "cache_dir": str(work / "data-cache"),
        },
        "train": {
            "max_steps": task.steps,
            "micro_batch_size": task.batch,
            "seed": seed,
            "eval_batches": 1000,  # all of the held-out rows
        },
        "log": {"every": 1000, "progress_bar": False, "trackers": []},
        "checkpoint": {"every": 0},
        "output": {"dir": str(work / f"{method}-{seed}"), "overwrite": True},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    t0 = time.perf_counter()
    trainer = Trainer(config_from_dict(cfg), init_distributed())
    trainer.setup()
    if method == "wlora-once-norm":
        _normalise_gate_gradients(trainer.selector)
    try:
        result = trainer.train()
        loss, acc = held_out(trainer.wl.peft_model, eval_ids)
        wl = trainer.wl
        kept_sites = wl.kept_sites()
        trainable = sum(p.numel() for p in wl.trainable_parameters() if p is not wl.gates)
    finally:
        trainer.cleanup()
    seconds = time.perf_counter() - t0
    t = task.selection_steps if sections["selection"].get("method") != "none" else 0
    sel = sum(h["step_seconds"] for h in result.history[:t]) + sum(
        h.get("prune_seconds", 0.0) + h.get("round_seconds", 0.0) for h in result.history
    )
    return RunResult(
        method,
        seed,
        loss,
        acc,
        len(kept_sites),
        trainable,
        sel,
        seconds,
        sorted(s.layer for s in kept_sites if s.layer is not None),
    )


def _normalise_gate_gradients(selector: Any) -> None:
    """The adapter_norm correction on the trainer's selector (one process: A and B whole):
    each gate's gradient divided by its adapter's ||B A||, rescaled by their mean."""
    from benchmarks.synthetic import _corrected

    update = selector.update_gates

    def corrected_update(optimizer_step: int, lr_w: float, clip: Any = None) -> dict[str, float]:
        wl = selector.wl
        wl.gates.grad = _corrected(wl, wl.gates.grad, "adapter_norm")
        return update(optimizer_step, lr_w, clip)

    selector.update_gates = corrected_update


def held_out_blocks(model_dir: Path, eval_path: Path, seq_len: int) -> torch.Tensor:
    """The held-out rows tokenised and packed exactly as the trainer reads them
    (wlora_dist.data.tokens.tokenize, format text): once per benchmark, every run scores them."""
    import datasets
    from transformers import AutoTokenizer

    from wlora_dist.config import DataConfig
    from wlora_dist.data.tokens import tokenize

    rows = [json.loads(line) for line in eval_path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = tokenize(datasets.Dataset.from_list(rows), tokenizer, DataConfig(format="text", seq_len=seq_len))
    return torch.tensor(blocks["input_ids"])


@torch.no_grad()
def held_out(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(loss, next-token accuracy) over every held-out token (``held_out_blocks``)."""
    was_training = model.training
    model.eval()
    right = total = 0
    loss_sum = 0.0
    for chunk in ids.split(32):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        target = chunk[:, 1:]
        loss_sum += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        right += int((logits.argmax(-1) == target).sum())
        total += target.numel()
    model.train(was_training)
    return loss_sum / total, right / total


def base_result(model_dir: Path, eval_ids: torch.Tensor) -> RunResult:
    """The pretrained model before any fine-tuning: what every method starts from."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss, acc = held_out(model, eval_ids)
    return RunResult("no fine-tuning", 0, loss, acc, 0, 0, 0.0, 0.0)


def summarise(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per method: mean and sample s.d. (n - 1) over seeds."""
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]

        def ms(values: list[float]) -> tuple[float, float]:
            return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        rows.append(
            {
                "method": method,
                "seeds": len(rs),
                "eval_loss": ms([r.eval_loss for r in rs]),
                "accuracy": ms([r.accuracy for r in rs]),
                "kept": ms([float(r.kept) for r in rs]),
                "trainable": ms([float(r.trainable) for r in rs]),
                "selection_seconds": ms([r.selection_seconds for r in rs]),
                "seconds": ms([r.seconds for r in rs]),
                "kept_layers": [r.kept_layers for r in rs],
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], task: Task, info: dict[str, Any]) -> str:
    lines = [
        f"n = {task.n} adapters, K = {task.k}, rank {task.rank}, {task.steps} steps (T = {task.selection_steps}), "
        f"{max(r['seeds'] for r in rows)} seeds; mean ± sample s.d. over seeds; accuracy = next-token top-1 "
        "on held-out text",
        "",
        "| method | held-out loss | accuracy | adapters kept | trained parameters | selection s | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['eval_loss'][0]:.3f} ± {r['eval_loss'][1]:.3f} "
            f"| {r['accuracy'][0]:.3f} ± {r['accuracy'][1]:.3f} | {r['kept'][0]:.0f} "
            f"| {r['trainable'][0]:,.0f} | {r['selection_seconds'][0]:.1f} | {r['seconds'][0]:.1f} |"
        )
    lines += ["", f"pretrained model: {json.dumps(info)}"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], results: list[RunResult], out: Path) -> Path | None:
    """Held-out loss and accuracy per method, one dot per seed (matplotlib if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "eval_loss", "held-out loss per token"),
        (axes[1], "accuracy", "next-token accuracy (held out)"),
    ):
        for i, name in enumerate(names):
            vals = [getattr(r, key) for r in results if r.method == name]
            ax.scatter([i] * len(vals), vals, s=18, color="C0" if name.startswith(("wlora", "simplex")) else "C7")
            ax.hlines(statistics.mean(vals), i - 0.3, i + 0.3, color="k")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel(label)
    fig.suptitle("Which K adapters? Same model, same batches, equal parameters (except lora-all)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    ap.add_argument("--steps", type=int, default=Task.steps, help="optimizer steps per run")
    ap.add_argument("--pretrain-steps", type=int, default=PretrainSpec.steps)
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-cache"), help="pretrained model, task data")
    ap.add_argument("--out", type=Path, default=Path("runs/chance"), help="JSON, table and plot")
    ap.add_argument("--mini", action="store_true", help="a seconds-long miniature (the test's)")
    ap.add_argument("--render", type=Path, metavar="CHANCE.json", help="only write the table and plot of a run")
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text()), args.out))
        return
    print(run(args)[2])


def run(args: argparse.Namespace) -> tuple[list[RunResult], list[dict[str, Any]], str]:
    from tqdm.auto import tqdm

    from wlora_dist.noise import silence_known_noise
    from wlora_dist.training.tracking import third_party_bars

    silence_known_noise()
    third_party_bars(False)
    logging.getLogger("wlora_dist").setLevel(logging.WARNING)
    if args.mini:
        task = Task(layers=2, rank=4, steps=6, selection_steps=2, batch=4, rows=20, max_files=40)
        spec = PretrainSpec(
            vocab=300, hidden=32, layers=2, intermediate=64, seq_len=32, batch=2, steps=3, max_chars=20_000
        )
    else:
        task = Task(steps=args.steps)
        spec = PretrainSpec(steps=args.pretrain_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "partial.jsonl").write_text("")  # one line per finished run, as it finishes
    bar = tqdm(total=spec.steps, desc="pretraining (cached after)", disable=None)

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.2f}")

    model_dir = pretrained_model(spec, args.cache, log=tqdm.write, progress=progress)
    bar.close()
    info = json.loads((model_dir / "pretrain.json").read_text())
    info = {k: info[k] for k in ("heldout_loss", "unigram_entropy", "corpus_chars", "tokens", "seconds")}
    data = make_task_data(task, args.cache / f"task-{task.rows}-{task.max_files}")
    eval_ids = held_out_blocks(model_dir, data[1], task.seq_len)
    results: list[RunResult] = [base_result(model_dir, eval_ids)]
    jobs = [(m, s) for s in range(args.seeds) for m in args.methods]
    with tempfile.TemporaryDirectory(prefix="wlora-chance-") as tmp:
        for method, seed in tqdm(jobs, desc="fine-tuning runs", disable=None):
            results.append(run_one(method, seed, task, model_dir, data, eval_ids, Path(tmp)))
            with open(args.out / "partial.jsonl", "a") as f:
                f.write(json.dumps(results[-1].__dict__) + "\n")
    saved = {"task": task.__dict__, "pretrained": info, "runs": [r.__dict__ for r in results]}
    text = render(saved, args.out)
    return results, summarise(results), text


def render(saved: dict[str, Any], out: Path) -> str:
    """chance.json (with its summary rows), chance.md and chance.png of a run's results."""
    out.mkdir(parents=True, exist_ok=True)
    results = [RunResult(**r) for r in saved["runs"]]
    task = Task(**saved["task"])
    rows = summarise(results)
    (out / "chance.json").write_text(json.dumps({**saved, "rows": rows}, indent=1))
    text = markdown(rows, task, saved["pretrained"])
    (out / "chance.md").write_text(text)
    plot(rows, results, out / "chance.png")
    return text


if __name__ == "__main__":
    main()
