"""Per-rank memory of a run, before and after the prune event, from shapes alone.

Pure arithmetic (no torch, no files: planning/sources.py reads presets, config.json files
and run configs into the ``PlanInput`` this takes; planning/text.py prints the result):
what one rank holds at its peak (the start of backward, when
every saved activation and the loss's vocabulary-sized buffers are alive), split into
base weights, adapters, gradients, optimizer state, activations and buffers (FSDP2 / ZeRO-3
all-gathered units, the root's unsharded embedding and lm_head).

Activations are counted tensor by tensor as autograd saves them in transformers' Llama
decoder layer with sdpa attention and peft LoRA (see ``layer_activation_bytes``); the
counts are checked against measured peaks in tests/test_memory_plan.py (CPU) and
benchmarks/ (GPU). No library computes this: accelerate's ``estimate-memory`` counts
weights only, DeepSpeed's ``estimate_zero*_model_states_mem_needs`` model states only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from wlora_dist.config import kept_count
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.planning.shapes import ALL_KINDS, ModelShape

GiB = 2**30
QUANTISED = ("int8", "nf4")  # planner bases stored quantised (gathered as stored, not cast)
QUANT_BASE = {"int8": "int8", "nf4": "nf4", "fp4": "nf4"}  # model.quantization -> planner base


@dataclass(frozen=True)
class PlanInput:
    shape: ModelShape
    world_size: int = 1
    backend: BackendSpec = BackendSpec("fsdp2")  # noqa: RUF009 (frozen: a shared default is safe)
    base: Literal["bf16", "fp32", "int8", "nf4"] = "bf16"  # nf4: bnb 4-bit, fp4 the same size
    blocksize_4bit: int = 64  # model.bnb_4bit_blocksize: one float32 absmax per this many weights
    double_quant_4bit: bool = False  # model.bnb_4bit_use_double_quant: a uint8 absmax + 4 bytes per 256 blocks
    compute: Literal["bf16", "fp32"] = "bf16"  # activations (autocast / FSDP2 param_dtype)
    lora_rank: int = 16
    targets: tuple[str, ...] = ALL_KINDS  # those the model has are counted
    lora_layers: tuple[int, ...] | None = None  # None = every layer
    lora_dropout: float = 0.0
    k: int | float = 32  # adapters kept after the prune event (a float: a share of the n sites)
    micro_batch: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step (train.grad_accum_steps): traffic only
    seq_len: int = 2048
    activation_checkpointing: bool = False
    checkpoint_every: int = 1  # with checkpointing: layers 0, N, 2N, ... (model.checkpoint_every_n_layers)
    loss_shards: int = 0  # train.loss_shards: the cross-entropy in tiles (wlora_dist/loss.py)
    offload_activations: bool = False  # train.offload_activations: what backward needs waits in host memory
    gpu_gib: float = 80.0
    reserve_gib: float = 2.0  # CUDA context, allocator fragmentation, NCCL buffers: not counted below
    int8_skip: tuple[str, ...] = ("lm_head",)
    kept: tuple[tuple[int, str], ...] | None = None  # the K kept (layer, module); None = the K largest


@dataclass
class Breakdown:
    """Bytes on one rank at its peak moment (``peak_at``)."""

    base: int
    adapters: int
    grads: int
    optimizer: int
    activations: int
    loss: int
    buffers: int
    n_adapters: int
    detail: dict[str, int] = field(default_factory=dict)
    peak_at: str = "loss"  # the moment of the step these bytes are alive together

    @property
    def total(self) -> int:
        return self.base + self.adapters + self.grads + self.optimizer + self.activations + self.loss + self.buffers

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass
class Plan:
    inp: PlanInput
    before: Breakdown  # selection phase: n adapters, gates training
    after: Breakdown  # after the prune event: K adapters, gates frozen
    budget: int  # bytes usable per rank (gpu_gib - reserve_gib)

    @property
    def fits_before(self) -> bool:
        return self.before.total <= self.budget

    @property
    def fits_after(self) -> bool:
        return self.after.total <= self.budget


# ---------------------------------------------------------------- sites and sizes


def sites(inp: PlanInput) -> list[tuple[int, str]]:
    layers = range(inp.shape.layers) if inp.lora_layers is None else inp.lora_layers
    named = {_named_site(t) for t in inp.targets if "." in t} - {None}  # e.g. "layers.3.mlp.down_proj"
    return [(i, t) for i in layers for t in inp.shape.kinds if t in inp.targets or (i, t) in named]


def _named_site(target: str) -> tuple[int, str] | None:
    """(layer, kind) of a dotted target such as "layers.3.mlp.down_proj"; None otherwise."""
    parts = target.split(".")
    for i, part in enumerate(parts[:-2]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1]), parts[-1]
    return None


def kept_sites(inp: PlanInput) -> list[tuple[int, str]]:
    """Which K adapters a run keeps is known only after selection; for memory, any K of
    the same kind cost the same. Unless given, we take the K largest (a bound)."""
    if inp.kept is not None:
        return list(inp.kept)
    dims = inp.shape.linear_dims()
    ranked = sorted(sites(inp), key=lambda s: -sum(dims[s[1]]))
    return ranked[: kept_count(inp.k, len(ranked))]


def adapter_numel(inp: PlanInput, chosen: list[tuple[int, str]]) -> int:
    dims = inp.shape.linear_dims()
    return sum(inp.lora_rank * sum(dims[t]) for _, t in chosen)


def _compute_bytes(inp: PlanInput) -> int:
    """Bytes per element of activations (bf16 autocast / FSDP2 param_dtype, else fp32)."""
    return 2 if inp.compute == "bf16" else 4


def _float_bytes(inp: PlanInput) -> int:
    return 4 if inp.base == "fp32" or (inp.base in QUANTISED and inp.compute == "fp32") else 2


def _4bit_bytes(numel: int, inp: PlanInput) -> int:
    """A 4-bit linear's storage: packed codes, then one float32 absmax per block, or under
    double quantisation one uint8 per block plus the nested state (a float32 per 256
    blocks and the offset; kept whole on every rank, 1/16384 of the weights: counted
    with the sharded part)."""
    blocks = numel // inp.blocksize_4bit
    if inp.double_quant_4bit:
        return numel // 2 + blocks + 4 * -(-blocks // 256) + 4
    return numel // 2 + 4 * blocks


def base_param_bytes(inp: PlanInput) -> tuple[int, int, int]:
    """(decoder layers, root modules: embedding + final norm + lm_head, one layer) bytes
    of the frozen base, whole model."""
    s, fb = inp.shape, _float_bytes(inp)
    per_layer = 0
    for _, (i, o) in s.linear_dims().items():
        if inp.base == "int8":
            per_layer += i * o + 4 * o  # int8 + fp32 row scales
        elif inp.base == "nf4":
            per_layer += _4bit_bytes(i * o, inp)
        else:
            per_layer += i * o * fb
    per_layer += 2 * s.hidden * fb  # two RMSNorm weights
    lm_head = s.vocab * s.hidden
    if inp.base not in QUANTISED or "lm_head" in inp.int8_skip:
        lm_bytes = lm_head * fb
    else:
        lm_bytes = lm_head if inp.base == "int8" else _4bit_bytes(lm_head, inp)
    root = s.vocab * s.hidden * fb + s.hidden * fb + (0 if s.tied else lm_bytes)
    return per_layer * s.layers, root, per_layer


def _shards_base(inp: PlanInput) -> bool:
    return inp.backend.shards_base


# ---------------------------------------------------------------- activations


def layer_activation_bytes(inp: PlanInput, layer_sites: set[str], gates_train: bool, grad_in: bool = True) -> float:
    """Bytes per token autograd keeps for backward in one Llama decoder layer (sdpa,
    frozen base linears, peft LoRA on ``layer_sites``; ``grad_in``: the layer's input
    requires grad, i.e. an earlier layer has an adapter):

    - each RMSNorm: its fp32 input (a frozen weight saves nothing else) and the rsqrt;
    - sdpa (flash / memory-efficient / CPU flash): q, k, v after RoPE, output, logsumexp;
      RoPE's multiplications save cos/sin only (shared by all layers);
    - MLP: SiLU's input, SiLU's output and up_proj's output (their product saves both);
    - a frozen linear saves its weight only, so a linear's input is kept only when it has
      an adapter: the norm outputs (shared by q/k/v and by gate/up), attention output
      (o_proj), the MLP product (down_proj); peft casts x to the adapter's dtype first,
      so where that differs (fp32 adapters under bf16 autocast, replicated backend) every
      adapter keeps its own copy;
    - each adapter: A's output (r); during selection the gate's product on it one more;
    - nothing is saved upstream of the first adapter of the model (no input requires grad).
    """
    s, c = inp.shape, _compute_bytes(inp)
    h, f, q, kv = s.hidden, s.intermediate, s.heads * s.d, s.kv_heads * s.d
    dims = s.linear_dims()
    norm = 4 * h + 4  # fp32 input + rsqrt
    attn_live = grad_in or bool(layer_sites & {"q_proj", "k_proj", "v_proj", "qkv_proj"})
    resid_live = attn_live or "o_proj" in layer_sites  # the residual after attention
    mlp_live = resid_live or bool(layer_sites & {"gate_proj", "up_proj", "gate_up_proj"})
    total = 0.0
    if grad_in:
        total += norm
    if attn_live:
        # sdpa: q, k, v, out, logsumexp. Under sequence parallelism the same bytes per token of
        # the chunk (the whole sequence for 1/N of the heads), key/value heads copied where N
        # exceeds them.
        kv_held = kv * max(1, inp.backend.sequence_parallel // s.kv_heads)
        total += c * (q + 2 * kv_held + q) + 4 * s.heads
    if resid_live:
        total += norm
    if mlp_live:
        total += 3 * c * f  # silu in, silu out, up out (fused gate_up: its 2f output, silu out)
    per_site_copy = inp.compute == "bf16" and inp.backend.casts_adapters_per_use  # fp32 adapters, bf16 x
    dropout = inp.lora_dropout > 0
    shared_inputs = {
        **{t: "n1" for t in ("q_proj", "k_proj", "v_proj", "qkv_proj")},
        **{t: "n2" for t in ("gate_proj", "up_proj", "gate_up_proj")},
    }
    inputs_kept: set[str] = set()
    for t in layer_sites:
        i = dims[t][0]
        if per_site_copy or dropout:
            total += c * i + (i if dropout else 0)  # own (cast / dropped-out) copy; dropout's bool mask
        else:
            inputs_kept.add(shared_inputs.get(t, t))
        total += c * inp.lora_rank
        if gates_train:
            total += c * inp.lora_rank  # the gate's product keeps A's output (method/weight_lora.py)
    for name in inputs_kept:
        total += c * {"n1": h, "n2": h, "o_proj": q, "down_proj": f}[name]
    return total


def activation_bytes(inp: PlanInput, chosen: list[tuple[int, str]], gates_train: bool) -> dict[str, int]:
    """Bytes alive in backward, by moment: ``saved`` (what the layers keep at the loss),
    ``recompute`` (activation checkpointing: one layer recomputed, its gradients in and
    out), ``loss`` (the fp32 log-softmax output it saves, nll's dense gradient and
    log-softmax's input gradient: three fp32 copies of the logits), ``head`` (then the
    logits' gradient, fp32 and compute dtype, while the lm_head runs backward)."""
    s, c = inp.shape, _compute_bytes(inp)
    n = inp.backend.sequence_parallel  # a rank keeps its chunk of each row (distributed.sequence_parallel)
    tokens = inp.micro_batch * -(-inp.seq_len // n)
    by_layer: dict[int, set[str]] = {}
    for i, t in chosen:
        by_layer.setdefault(i, set()).add(t)
    # Layers before the first adapter save nothing, except under activation checkpointing:
    # transformers then makes the embedding output require grad (enable_input_require_grads).
    first = 0 if inp.activation_checkpointing else min(by_layer, default=s.layers)
    per_layer = [
        layer_activation_bytes(inp, by_layer.get(i, set()), gates_train, grad_in=i > first) for i in range(s.layers)
    ]
    final = 4 * s.hidden + 4 + 2 * c * s.d  # final norm; cos / sin (shared by all layers)
    if inp.activation_checkpointing:
        # A checkpointed layer keeps its input only and is recomputed in backward (one at a
        # time); the others (checkpoint_every > 1) keep their activations.
        ckpt = [i % inp.checkpoint_every == 0 for i in range(s.layers)]
        kept = [c * s.hidden if ck else a for ck, a in zip(ckpt, per_layer, strict=True)]
        recompute = max(a for ck, a in zip(ckpt, per_layer, strict=True) if ck) + 2 * c * s.hidden
    else:
        kept, recompute = per_layer, 0
    saved = sum(kept) + final
    offloaded = 0.0
    if inp.offload_activations:
        # In host memory from the forward on; backward brings back one layer's at a time.
        offloaded, saved = saved, max(kept) + final
    if inp.loss_shards:
        # Tiled (loss.py): the logits, their gradient buffer, and one tile's fp32 log-softmax
        # output, nll gradient, log-softmax gradient and compute-dtype gradient.
        loss = 2 * c * s.vocab + (12 + c) * s.vocab / min(inp.loss_shards, tokens)
        head = c * s.vocab  # the logits' gradient, computed in the forward
    else:
        loss, head = 3 * 4 * s.vocab, (4 + c) * s.vocab
    return {
        "saved": int(saved * tokens),
        "recompute": int(recompute * tokens),
        "loss": int(loss * tokens),
        "head": int(head * tokens),
        "offloaded": int(offloaded * tokens),
    }


# ---------------------------------------------------------------- the plan


def breakdown(inp: PlanInput, chosen: list[tuple[int, str]], gates_train: bool) -> Breakdown:
    ws = inp.world_size
    layers_b, root_b, one_layer = base_param_bytes(inp)
    base = layers_b + root_b
    sharded = _shards_base(inp)
    shard = inp.backend.mesh_shape(ws)[1]  # ranks sharing one copy of the base (HSDP: a node's)
    base_rank = math.ceil(base * inp.backend.base_fraction(ws)) if sharded else base  # + hpZ's second partition
    offload = inp.backend.offload
    if offload and sharded:
        base_rank = 0
    numel = adapter_numel(inp, chosen)
    n = len(sites(inp))
    adapters, grads, optim = inp.backend.trainable_bytes(numel, ws, _compute_bytes(inp))
    adapters += 4 * n  # the gate vector (replicated)
    if gates_train:
        grads += 4 * n
    acts = activation_bytes(inp, chosen, gates_train)
    gathered_root = gathered_head = gathered_layer = 0
    if sharded and shard > 1:
        fb = _float_bytes(inp)
        cast = (2 if inp.compute == "bf16" else fb) / fb  # FSDP2 gathers bf16 copies under mixed precision
        head = inp.shape.vocab * inp.shape.hidden * fb
        # The root unit stays gathered from forward to backward: tied embeddings live
        # there. Untied, FSDP2 makes the embedding and lm_head units of their own, and
        # the lm_head is gathered again for its backward. Decoder layers are
        # gathered one at a time, the next one prefetched. ZeRO-3 gathers by module too.
        gathered_root = int((root_b if inp.shape.tied else root_b - 2 * head) * cast)
        gathered_head = 0 if inp.shape.tied else int(head * cast)
        gathered_layer = int(one_layer * (1.0 if inp.base in QUANTISED else cast))
    bucket = inp.backend.grad_bucket_bytes(numel, _compute_bytes(inp))
    moments = {
        # Measured (plan_check, FSDP2): the lm_head is gathered by the time the loss's
        # buffers peak, its backward being next.
        "loss": (acts["saved"], acts["loss"], gathered_root + gathered_head + bucket),
        "lm_head backward": (acts["saved"], acts["head"], gathered_root + gathered_head + gathered_layer + bucket),
    }
    if inp.activation_checkpointing:
        moments["layer recompute"] = (acts["saved"] + acts["recompute"], 0, gathered_root + 2 * gathered_layer + bucket)
    peak_at = max(moments, key=lambda m: sum(moments[m]))
    act, loss, buffers = moments[peak_at]
    detail = {
        "gathered_root": gathered_root,
        "gathered_lm_head": gathered_head,
        "gathered_layer": gathered_layer,
        "zero_grad_bucket": bucket,
    }
    return Breakdown(
        base=int(base_rank),
        adapters=int(adapters),
        grads=int(grads),
        optimizer=int(optim),
        activations=act,
        loss=loss,
        buffers=buffers,
        n_adapters=len(chosen),
        detail=detail,
        peak_at=peak_at,
    )


def host_bytes_per_rank(inp: PlanInput) -> int:
    """Host (CPU) memory one rank needs under CPU offload, at the larger of the two phases:
    its base share (FSDP2's cpu_offload / ZeRO-3 offload_param move it), the fp32 adapter
    masters, their gradients (FSDP2) and the optimizer state; and the activations
    train.offload_activations keeps there. 0 without either."""
    acts = activation_bytes(inp, sites(inp), gates_train=True)["offloaded"]
    if not inp.backend.offload:
        return acts
    ws = inp.world_size
    base = sum(base_param_bytes(inp)[:2])
    share = math.ceil(base * inp.backend.base_fraction(ws)) if inp.backend.shards_base else 0
    numel = adapter_numel(inp, sites(inp))
    parts = inp.backend.mesh_shape(ws)[1] if inp.backend.kind == "fsdp2" else ws
    trainable = (4 + 8 + (4 if inp.backend.kind == "fsdp2" else 0)) * numel / parts
    return int(share + trainable) + acts


def plan(inp: PlanInput) -> Plan:
    before = breakdown(inp, sites(inp), gates_train=True)
    after = breakdown(inp, kept_sites(inp), gates_train=False)
    return Plan(inp, before, after, int((inp.gpu_gib - inp.reserve_gib) * GiB))
