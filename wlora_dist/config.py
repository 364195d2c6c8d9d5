"""The run configuration: one typed tree, loaded from YAML, validated at once.

Every field carries its documentation (the one source of ``--help``). Loading checks
types, unknown keys and contradictions and reports *every* problem in one
:class:`ConfigError`, each line naming the field, the value and the fix.

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["train.max_steps=20"])
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from wlora_dist.errors import UserError

# The linears of a Llama decoder layer, in layer order: the adapter sites of the method and
# the planner's module kinds (one list for the whole project).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 fuses q/k/v and gate/up into one linear each; no other family has these names.
FUSED_LINEARS = ("qkv_proj", "gate_up_proj")


class ConfigError(UserError):
    """All problems found in a configuration, one per line."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    path: str = _f("", "Base model: a local HF folder or a hub id (hub ids need internet).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Dtype of the frozen base weights; auto = bfloat16 on GPU, float32 on CPU."
    )
    trust_remote_code: bool = _f(False, "Allow code from the model folder/hub to run. Off by default.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory, ~30% slower).")
    checkpoint_every_n_layers: int = _f(
        1,
        "With gradient_checkpointing: checkpoint decoder layers 0, N, 2N, ... only; the others keep their "
        "activations (transformers' every_n_layers). 1 = every layer.",
    )
    sharded_loading: bool = _f(
        True, "fsdp2 / zero stage 3: never a full model per rank (meta init + own rows / partitioned init)."
    )
    quantization: Literal["none", "int8", "nf4", "fp4"] = _f(
        "none",
        "Frozen base in 8-bit (bitsandbytes LLM.int8): int8 weights + per-row scales, quantised row by row as "
        "they load (or read as they are from a folder saved in bitsandbytes 8-bit); nf4 / fp4: bitsandbytes 4-bit "
        "(QLoRA's base), packed codes + per-block absmax, quantised row by row as they load (or read as they are "
        "from a folder saved in bitsandbytes 4-bit). All shardable by "
        "fsdp2 / zero 3.",
    )
    bnb_4bit_blocksize: int = _f(64, "nf4 / fp4: elements per quantisation block (bitsandbytes' blocksize).")
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "nf4 / fp4: dtype of the 4-bit matmul's input and output; auto = the activations' dtype."
    )
    bnb_4bit_use_double_quant: bool = _f(
        False,
        "nf4 / fp4: quantise the per-block absmax once more (bitsandbytes' double quantisation, QLoRA's): "
        "about 0.37 bits per parameter less at block size 64.",
    )
    int8_threshold: float = _f(
        6.0, "LLM.int8 outlier threshold (transformers' llm_int8_threshold); 0 = no fp16 outlier columns."
    )
    int8_skip_modules: list[str] = _f(
        ["lm_head"],
        "Linear module names kept in model.dtype under int8 / nf4 / fp4 (transformers' llm_int8_skip_modules).",
    )


@dataclass
class AdapterConfig:
    lora_rank: int = _f(8, "LoRA rank r of every adapter.")
    lora_alpha: float = _f(32.0, "LoRA alpha; the adapter output is scaled by alpha / r.")
    lora_dropout: float = _f(0.0, "Dropout on the adapter input (peft's lora_dropout).")
    target_modules: list[str] = _f(
        [*LLAMA_LINEARS, *FUSED_LINEARS],
        "Linear module names that get an adapter (the default covers Llama, Qwen2/3, Mistral, Gemma 1/2/3 and "
        "Phi-3's fused qkv_proj / gate_up_proj).",
    )
    layers: list[int] | None = _f(None, "Decoder layer indices that get adapters; null = all layers.")
    include_lm_head: bool = _f(
        False, "Also put an adapter (and a gate) on lm_head, as the authors' LLM pipeline does (n = 7L + 1)."
    )


@dataclass
class SelectionConfig:
    preset: Literal["none", "authors"] = _f(
        "none",
        "authors: the authors' LLM pipeline in one setting (project every step, signed top-K, constant selection "
        "LR, fresh A/B and AdamW at the prune event, lm_head a candidate, gates clipped with the adapters, AdamW "
        "eps 1e-6). Fields you set yourself win over the preset.",
    )
    method: Literal["topk", "simplex", "none"] = _f(
        "topk", "Projection of the gates: keep the K best (topk), onto the simplex, or none (plain LoRA)."
    )
    k: int = _f(4, "Adapters kept by the top-K projection (1 <= k <= n).")
    topk_by: Literal["signed", "magnitude"] = _f("signed", "Top-K by signed value (the authors' code) or by |w|.")
    lr_w: float = _f(
        5.0,
        "SGD learning rate of the gates (times the same multiplier as optim.lr, see selection.schedule); authors: 5.0.",
    )
    steps: int = _f(10, "Selection phase length T in optimizer steps; the prune event follows step T.")
    steps_fraction: float = _f(
        0.0,
        "> 0: the selection phase is this fraction of the run's steps instead of selection.steps (rounded, at "
        "least 1; a multiple of selection.rounds); for runs sized by train.epochs.",
    )
    project_every: int | None = _f(
        None,
        "Project the gates every P optimizer steps during selection (and always at T); 0 = only at T; null "
        "(default) = four projections, every ceil(T/4) steps: on planted-subset tasks this recovered the planted "
        "adapters most reliably (docs/method.md, 'Defaults, by evidence'). The authors project every step (1).",
    )
    schedule: Literal["constant", "main"] = _f(
        "constant",
        "LR during selection: constant (lr and lr_w at their peak, the authors' choice; the warmup/decay schedule "
        "then starts at the prune event) or main (one warmup/decay schedule over the whole run scales both).",
    )
    reinit_kept: bool = _f(False, "Re-initialise the kept adapters (and their Adam state) at the prune event.")
    reset_optimizer: bool = _f(False, "Fresh AdamW state for the kept adapters at the prune event (authors: yes).")
    clip_gates: bool = _f(
        False,
        "Clip the gates' gradient together with the adapters' (one norm over both, optim.max_grad_norm), as the "
        "authors' trainer does; false clips the adapters alone. Not available with distributed.backend zero.",
    )
    fold_gates: bool = _f(False, "At the prune event fold w into B (B <- w*B) and set kept gates to 1.")
    grad_eps: float = _f(1e-12, "Skip the projection while ||grad_w|| <= grad_eps (true at step 1).")
    rounds: int = _f(
        0,
        "WeightLoRA+ (the authors' FatLoRA): R > 0 halving rounds at steps T/R, 2T/R, ..., T; each round keeps "
        "the best half (K = n, n/2, ..., n/2^R; selection.k is not used), removes the rest and doubles the "
        "rank of every kept adapter, so the adapter parameter budget stays the same. 0 = plain WeightLoRA.",
    )
    extension: Literal["smart", "dummy", "restart"] = _f(
        "smart",
        "WeightLoRA+ rank doubling: smart (QR, the product BA and the model output unchanged), dummy ([A; N], "
        "[B, 0], unchanged too) or restart (fresh A, zero B).",
    )


@dataclass
class OptimConfig:
    lr: float = _f(3e-4, "Peak AdamW learning rate of the adapters.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the adapters' gradient norm to this; 0 disables.")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    warmup_ratio: float = _f(0.0, "> 0: warmup steps as this fraction of the run instead of warmup_steps.")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "LR decay after warmup.")
    min_lr_ratio: float = _f(0.0, "Final LR as a fraction of the peak (cosine/linear).")


@dataclass
class DataConfig:
    train: list[str] = _f([], "Training data: json/jsonl/csv/parquet files, a saved dataset folder, or a hub id.")
    eval: list[str] = _f([], "Held-out data in the same forms; empty = split eval_fraction off train.")
    eval_fraction: float = _f(0.05, "Share of the training rows held out when no eval data is given.")
    format: Literal["text", "instruction", "chat"] = _f(
        "text", "text: causal LM packed to seq_len; instruction: loss on the response only; chat: messages."
    )
    text_field: str = _f("text", "Column with the text (format=text).")
    prompt_field: str = _f("prompt", "Column with the prompt (format=instruction).")
    response_field: str = _f("response", "Column with the response (format=instruction).")
    messages_field: str = _f("messages", "Column with the chat messages (format=chat).")
    split: str = _f("train", "Split to read from a hub dataset or a saved DatasetDict.")
    seq_len: int = _f(256, "Tokens per training row (text is packed to it; longer rows are truncated).")
    truncate: bool = _f(True, "Truncate instruction/chat rows longer than seq_len (else it is an error).")
    template: Literal["auto", "chat", "plain"] = _f(
        "auto",
        "format=instruction: chat = the prompt as the user turn and the response as the assistant turn through "
        "the tokenizer's chat template (as TRL does for prompt/completion data); plain = prompt + ' ' + "
        "response + EOS; auto = chat when the tokenizer has a template (instruct models), else plain.",
    )
    packing: bool = _f(
        False,
        "format=instruction / chat: pack several rows into each seq_len row (in order, as many as fit), with "
        "position ids restarting per row so no token attends to another row's (the loss of every row is what it "
        "is unpacked). format=text is always packed (one stream).",
    )
    cache_dir: str = _f(
        "",
        "Where rank 0 writes the tokenised data (datasets' Arrow files, keyed by data, tokenizer and these "
        "settings) for every rank to read, and a rerun or resume to reuse; empty = <output.dir>/data_cache.",
    )


@dataclass
class TrainConfig:
    max_steps: int = _f(100, "Optimizer steps in total (selection phase included); see train.epochs.")
    epochs: float = _f(
        0.0,
        "> 0: train this many passes over the training rows instead of train.max_steps (set one of the two); "
        "max_steps = ceil(epochs x optimizer steps per epoch). selection.steps_fraction and optim.warmup_ratio "
        "size the selection phase and the warmup from it.",
    )
    micro_batch_size: int = _f(4, "Rows per rank per forward/backward.")
    grad_accum_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    seed: int = _f(0, "Seed for init, dropout and data order (same on every rank).")
    mixed_precision: Literal["auto", "bf16", "no", "fp16"] = _f(
        "auto", "bf16 autocast on GPU (auto), or none; CPU runs in the base dtype."
    )
    loss_shards: int = _f(
        0,
        "0 = transformers' loss; N = the cross-entropy in N tiles of tokens (DeepSpeed's TiledFusedLogitsLoss): "
        "the same loss, without three fp32 copies of the logits at the peak (at 128k vocabulary the largest "
        "activation); 8 is a good start.",
    )
    eval_every: int = _f(0, "Evaluate every N optimizer steps (0 = only at the end).")
    eval_batches: int = _f(8, "Micro-batches per evaluation (per rank).")


@dataclass
class LogConfig:
    every: int = _f(10, "Write a plain log line and tracker values every N optimizer steps.")
    trackers: list[Literal["tensorboard", "jsonl", "wandb", "mlflow"]] = _f(
        ["jsonl", "tensorboard"],
        "Trackers written by rank 0 (accelerate's tracker classes): jsonl and tensorboard under <output.dir>/logs; "
        "wandb (Weights & Biases; WANDB_MODE=offline works without an account) and mlflow (MLFLOW_TRACKING_URI, "
        "else an SQLite store in <output.dir>/logs/mlflow.db) need `pip install 'wlora-dist[trackers]'`.",
    )
    project: str = _f("wlora_dist", "W&B project / MLflow experiment the run is logged under.")
    run_name: str = _f("", "Name of the run in W&B / MLflow; empty = the output folder's name.")
    progress_bar: bool = _f(True, "tqdm progress bar on rank 0.")


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = _f(True, "Free gathered parameters after forward (less memory, one more all-gather).")
    cpu_offload: bool = _f(False, "Keep sharded parameters, gradients and optimizer state in CPU memory.")
    mixed_precision: Literal["bf16", "no"] = _f("bf16", "On GPU: bf16 compute copies, fp32 gradient reduction.")


@dataclass
class ZeROConfig:
    stage: int = _f(2, "ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters, base included).")
    offload_optimizer: bool = _f(False, "Keep optimizer state in CPU memory.")
    offload_params: bool = _f(False, "Keep parameters in CPU memory (stage 3).")
    config_file: str = _f("", "Your own DeepSpeed JSON; its values win over ours except where they are 'auto'.")


@dataclass
class DistributedConfig:
    backend: Literal["auto", "replicated", "fsdp2", "zero"] = _f(
        "auto",
        "auto: what `accelerate launch --config_file` chose (FSDP -> fsdp2, DEEPSPEED -> zero), else replicated; "
        "replicated: every rank holds the model, adapter grads all-reduced; fsdp2: torch FSDP2 shards "
        "base and adapters; zero: DeepSpeed ZeRO (distributed.zero.stage).",
    )
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    zero: ZeROConfig = field(default_factory=ZeROConfig)
    timeout_minutes: float = _f(30.0, "Collective timeout: a dead rank fails the others after this long.")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "Save a checkpoint every N optimizer steps (0 = no step interval).")
    every_minutes: float = _f(
        0.0,
        "Also save when this many minutes have passed since the last save (0 = no time interval): what "
        "preemptible clusters need. A stop signal (SIGTERM, SIGUSR1, Ctrl-C) always saves.",
    )
    keep_last: int = _f(2, "Checkpoints kept (the newest); older ones are deleted once a new one is complete.")
    dir: str = _f("", "Where checkpoints go; empty = <output.dir>/checkpoints.")
    resume_from: str = _f(
        "",
        "'' = start fresh; 'auto' = the newest checkpoint in checkpoint.dir if there is one (for requeued jobs); "
        "'latest' = the newest (an error if none); or a checkpoint folder (step-NNNNNNNN).",
    )
    save_on_signal: bool = _f(
        True, "On SIGTERM / SIGUSR1 / Ctrl-C: finish the step, save a checkpoint, exit 0 (Ctrl-C twice: at once)."
    )


@dataclass
class MemoryConfig:
    replan_at_prune: bool = _f(
        False,
        "At the prune event, when model.gradient_checkpointing is on and the memory plan (wlora-dist plan) says "
        "the K kept adapters fit memory.budget_gib without it, switch it off, else checkpoint the fewest layers "
        "that fit (model.checkpoint_every_n_layers): the same math, a faster step.",
    )
    budget_gib: float = _f(0.0, "Memory per rank the plan may use; 0 = the GPU's total memory (CPU runs: set it).")
    reserve_gib: float = _f(2.0, "Left out of the budget: CUDA context, NCCL buffers, allocator fragmentation.")


@dataclass
class OutputConfig:
    dir: str = _f("runs/default", "Run folder: adapter/, report/, logs/.")
    overwrite: bool = _f(False, "Allow replacing an existing adapter in output.dir.")
    reports: bool = _f(
        True, "Write the selection report (JSON + gate heatmap) at the prune event and each WeightLoRA+ round."
    )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    bad = f"{where}: got {value!r}, expected {_type_name(tp)}"
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, where, problems)
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(bad)
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, list):
            problems.append(bad)
            return value
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(bad + " (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(bad)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(bad)
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(bad)
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: got {data!r}, expected a mapping of fields")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            near = [k for k in known if k.startswith(str(key)[:3])]
            hint = f"; did you mean {near[0]!r}?" if near else f"; known fields: {', '.join(known)}"
            problems.append(f"{where + '.' if where else ''}{key}: unknown field{hint}")
    kwargs = {}
    for name in known:
        if name not in data:
            continue
        sub = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], sub, problems)
        else:
            kwargs[name] = _coerce(data[name], tp, sub, problems)
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {dotted}: {p} is not a section"], "command line")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (key, YAML-typed value)."""
    pairs, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"{item!r}: overrides are written key.sub=value, e.g. train.max_steps=50")
            continue
        try:
            pairs.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as e:
            problems.append(f"{key}: value {raw!r} is not valid YAML ({e.__class__.__name__})")
    if problems:
        raise ConfigError(problems, "command line")
    return pairs


# selection.preset: authors -> the authors' LLM pipeline (public code, branch weight_lora).
PRESETS: dict[str, dict[str, Any]] = {
    "authors": {
        "selection.project_every": 1,
        "selection.topk_by": "signed",
        "selection.lr_w": 5.0,
        "selection.schedule": "constant",
        "selection.reinit_kept": True,
        "selection.reset_optimizer": True,
        "selection.clip_gates": True,
        "adapter.include_lm_head": True,
        "optim.eps": 1e-6,
    }
}


def _apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """The preset's values under the user's: a field set in the config or on the command
    line keeps its value."""
    section = data.get("selection")
    name = section.get("preset", "none") if isinstance(section, dict) else "none"
    if name not in PRESETS:
        return data  # the field's own validation names the choices
    out = copy.deepcopy(data)
    for dotted, value in PRESETS[name].items():
        sec, leaf = dotted.split(".")
        node = out.setdefault(sec, {})
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return out


# (field that sizes from the run, field it replaces): setting both is a contradiction.
_EITHER_OR = (
    ("train.epochs", "train.max_steps"),
    ("selection.steps_fraction", "selection.steps"),
    ("optim.warmup_ratio", "optim.warmup_steps"),
)


def _both_set(data: dict[str, Any]) -> list[str]:
    """A ratio field and the count it replaces, both given by the user."""
    out = []
    for ratio, count in _EITHER_OR:
        (sec, r), (_, c) = ratio.split("."), count.split(".")
        node = data.get(sec)
        if isinstance(node, dict) and node.get(r) and c in node:
            out.append(f"{ratio}: {node[r]!r} and {count}: {node[c]!r} both set; keep one of the two")
    return out


def size_run(cfg: RunConfig, steps_per_epoch: int) -> list[str]:
    """Turn train.epochs / selection.steps_fraction / optim.warmup_ratio into step counts,
    once the data say how many optimizer steps one epoch is; return what no longer fits."""
    t, s, o = cfg.train, cfg.selection, cfg.optim
    if t.epochs > 0:
        t.max_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
    if s.steps_fraction > 0:
        unit = max(1, s.rounds)
        s.steps = max(unit, round(s.steps_fraction * t.max_steps / unit) * unit)
    if o.warmup_ratio > 0:
        o.warmup_steps = round(o.warmup_ratio * t.max_steps)
    t.epochs, s.steps_fraction, o.warmup_ratio = 0.0, 0.0, 0.0  # now counts: the checks below see them
    return validate(cfg)


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    data = _apply_preset(data)
    problems: list[str] = []
    cfg = _build(RunConfig, data, "", problems)
    if not problems:
        problems += _both_set(data) + validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    launcher: list[tuple[str, Any]] | None = None,
) -> RunConfig:
    """Read a YAML run config, apply the launcher's settings (``launcher``, e.g. from an
    accelerate config), then ``key.sub=value`` overrides; validate."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist; pass an existing YAML file"], source)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(data, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], source)
    launcher = launcher or []
    chosen = dict(launcher).get("distributed.backend")
    in_file = (
        (data.get("distributed") or {}).get("backend", "auto") if isinstance(data.get("distributed"), dict) else "auto"
    )
    if chosen and in_file not in ("auto", chosen):
        raise ConfigError(
            [
                f"distributed.backend: {in_file!r} in the config, but the accelerate config launched {chosen!r}; "
                "set distributed.backend: auto (or the same value), or launch with a matching accelerate config"
            ],
            source,
        )
    parsed = parse_overrides(overrides or [])
    on_command_line = dict(parsed).get("distributed.backend")
    if chosen and on_command_line not in (None, "auto", chosen):
        raise ConfigError(
            [
                f"distributed.backend={on_command_line} on the command line, but the accelerate config launched "
                f"{chosen!r}; drop the override, or launch with an accelerate config for {on_command_line}"
            ],
            source,
        )
    for key, value in [*launcher, *parsed]:
        set_dotted(data, key, value)
    return config_from_dict(data, source)


def validate(cfg: RunConfig) -> list[str]:
    """Contradictions and out-of-range values that types alone do not catch."""
    p: list[str] = []
    if not cfg.model.path:
        p.append("model.path: empty; set it to an HF model folder or hub id")
    if cfg.model.checkpoint_every_n_layers < 1:
        p.append(f"model.checkpoint_every_n_layers: {cfg.model.checkpoint_every_n_layers} must be >= 1")
    if cfg.model.quantization in ("nf4", "fp4"):
        bs = cfg.model.bnb_4bit_blocksize
        if bs not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            p.append(f"model.bnb_4bit_blocksize: {bs} must be a power of two from 32 to 4096 (bitsandbytes' choices)")
    if cfg.model.int8_threshold < 0:
        p.append(f"model.int8_threshold: {cfg.model.int8_threshold} must be >= 0")
    a, s, o, t, d = cfg.adapter, cfg.selection, cfg.optim, cfg.train, cfg.data
    if a.lora_rank <= 0:
        p.append(f"adapter.lora_rank: {a.lora_rank} must be >= 1")
    if not 0.0 <= a.lora_dropout < 1.0:
        p.append(f"adapter.lora_dropout: {a.lora_dropout} must be in [0, 1)")
    if not a.target_modules:
        p.append("adapter.target_modules: empty; name at least one linear, e.g. [q_proj, v_proj]")
    if a.layers is not None and any(i < 0 for i in a.layers):
        p.append(f"adapter.layers: {a.layers} has a negative index")
    if s.method == "topk" and s.k <= 0:
        p.append(f"selection.k: {s.k} must be >= 1 (number of adapters kept)")
    if s.lr_w < 0:
        p.append(f"selection.lr_w: {s.lr_w} must be >= 0")
    elif s.lr_w == 0 and s.method in ("topk", "simplex"):
        p.append(
            f"selection.lr_w: 0 with selection.method={s.method} never moves the gates (all stay tied, so the "
            "first K in name order would be kept); use a positive value (the authors' is 5.0), or method: none"
        )
    if s.steps < 0:
        p.append(f"selection.steps: {s.steps} must be >= 0")
    if t.epochs < 0:
        p.append(f"train.epochs: {t.epochs} must be >= 0 (0 = train.max_steps sets the length)")
    if not 0 <= s.steps_fraction < 1:
        p.append(f"selection.steps_fraction: {s.steps_fraction} must be in [0, 1)")
    if not 0 <= o.warmup_ratio < 1:
        p.append(f"optim.warmup_ratio: {o.warmup_ratio} must be in [0, 1)")
    sized_later = t.epochs > 0  # max_steps follows from the data (size_run)
    if s.method != "none" and s.steps > t.max_steps and not sized_later and not s.steps_fraction:
        p.append(f"selection.steps: {s.steps} exceeds train.max_steps={t.max_steps}; lower it or raise max_steps")
    if s.rounds < 0:
        p.append(f"selection.rounds: {s.rounds} must be >= 0")
    if s.rounds > 0 and s.method != "topk":
        p.append(f"selection.rounds: {s.rounds} (WeightLoRA+) needs selection.method=topk, not {s.method}")
    if s.rounds > 0 and not s.steps_fraction and (s.steps < s.rounds or s.steps % s.rounds):
        p.append(
            f"selection.rounds: {s.rounds} must divide selection.steps={s.steps} (rounds at steps T/R, 2T/R, ..., T)"
        )
    if s.project_every is not None and s.project_every < 0:
        p.append(f"selection.project_every: {s.project_every} must be >= 0 (0 = once, at step T)")
    if o.lr < 0:
        p.append(f"optim.lr: {o.lr} must be >= 0")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay: {o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas: {o.betas} must be two numbers in [0, 1)")
    if o.max_grad_norm < 0:
        p.append(f"optim.max_grad_norm: {o.max_grad_norm} must be >= 0 (0 disables clipping)")
    if o.warmup_steps < 0 or (o.warmup_steps > t.max_steps and not sized_later and not o.warmup_ratio):
        p.append(f"optim.warmup_steps: {o.warmup_steps} must be in [0, train.max_steps={t.max_steps}]")
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio: {o.min_lr_ratio} must be in [0, 1]")
    if not d.train:
        p.append("data.train: empty; give a data file, dataset folder or hub id")
    if not 0 <= d.eval_fraction < 1:
        p.append(f"data.eval_fraction: {d.eval_fraction} must be in [0, 1)")
    if d.seq_len < 2:
        p.append(f"data.seq_len: {d.seq_len} must be >= 2")
    for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches"):
        if getattr(t, name) <= 0:
            p.append(f"train.{name}: {getattr(t, name)} must be >= 1")
    if t.loss_shards < 0:
        p.append(f"train.loss_shards: {t.loss_shards} must be >= 0 (0 = transformers' loss)")
    if t.eval_every < 0:
        p.append(f"train.eval_every: {t.eval_every} must be >= 0")
    if t.mixed_precision == "fp16":
        p.append("train.mixed_precision: fp16 is not supported (loss scaling would scale the gates); use bf16 or no")
    if cfg.distributed.zero.stage not in (1, 2, 3):
        p.append(f"distributed.zero.stage: {cfg.distributed.zero.stage} must be 1, 2 or 3")
    if cfg.distributed.zero.offload_params and cfg.distributed.zero.stage != 3:
        p.append("distributed.zero.offload_params: needs distributed.zero.stage=3")
    if cfg.distributed.timeout_minutes <= 0:
        p.append(f"distributed.timeout_minutes: {cfg.distributed.timeout_minutes} must be > 0")
    if cfg.checkpoint.every < 0:
        p.append(f"checkpoint.every: {cfg.checkpoint.every} must be >= 0 (0 = only on a stop signal)")
    if cfg.checkpoint.every_minutes < 0:
        p.append(f"checkpoint.every_minutes: {cfg.checkpoint.every_minutes} must be >= 0 (0 = no time interval)")
    if cfg.checkpoint.keep_last < 1:
        p.append(f"checkpoint.keep_last: {cfg.checkpoint.keep_last} must be >= 1")
    if cfg.memory.budget_gib < 0 or cfg.memory.reserve_gib < 0:
        p.append(f"memory.budget_gib / reserve_gib: {cfg.memory.budget_gib} / {cfg.memory.reserve_gib} must be >= 0")
    if cfg.log.every <= 0:
        p.append(f"log.every: {cfg.log.every} must be >= 1")
    return p


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default, documentation (for --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}:")
            lines += describe(tp, name + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('doc', '')}")
    return lines
