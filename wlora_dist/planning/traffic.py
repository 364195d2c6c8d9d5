"""What one optimizer step moves through collectives, per rank, inside a node and across
nodes, before and after the prune event: from shapes alone, as memory_plan.py does for bytes
held.

Pure arithmetic. Each backend's step is listed as collectives (which tensor, how large, on
which process group, how many times), following what FSDP2 and DeepSpeed ZeRO-3 were
measured to call on CPU (benchmarks/traffic.py counts every c10d op of real gloo runs;
tests/test_traffic.py holds the model to those counts within 5%):

- **FSDP2 / HSDP**: every FSDP unit (each decoder layer's base, the embedding, the lm_head,
  the root's final norm, each adapter's A and B) is all-gathered in forward and again in
  backward (``reshard_after_forward``), except upstream of the first adapter, where no
  backward runs: there only the unit just before it is gathered (FSDP2's backward
  prefetch); activation checkpointing's recomputation adds none (the backward's gather
  serves it), and makes every layer run backward. Each parameter's first dimension is padded to a
  multiple of the shard group. Adapter gradients are reduce-scattered (fp32) in the shard
  group, and under HSDP each rank's shard is then all-reduced across the replicas. All of
  it once per micro-batch.
- **ZeRO-3**: each parameter over ``stage3_param_persistence_threshold`` elements is
  gathered in forward, and each decoder layer's again in backward, except the last
  layer's, which the reuse distance (one layer, distributed/zero_config.py) keeps when the
  lm_head is smaller than a layer; under activation checkpointing the recomputation
  gathers each of those layers once more. Gradients (the compute dtype) are
  reduce-scattered over every rank. **hpZ**: after the first step the frozen base is
  gathered from the secondary partition inside a node (it never changes, so DeepSpeed
  never invalidates it); the adapters, updated every step, are gathered across the world
  in the first micro-batch's forward and from the secondary partition after that.
- Other: the loss (4 bytes, all-reduced), DeepSpeed's gradient norm, and during selection
  the gates' gradient (all-reduced) and the bitwise check of the gate vector (all-gathered).
- ZeRO-3 parameters at or under the persistence threshold are gathered once per
  optimizer step, whatever the micro-batches. DeepSpeed's broadcasts (tens of KiB in the
  second and third steps after an engine is built, none after) are not per-step traffic
  and not counted.

**Bytes moved** (``moved``) count, for rank 0, what arrives from or leaves for each other
member of the group: an all-gather receives each peer's chunk (S/p from each of p - 1), a
reduce-scatter sends each peer its chunk, an all-reduce does both (a reduce-scatter and an
all-gather). A chunk is "across nodes" when the peer is on another node (ranks are
placed node by node, ``gpus_per_node`` to a node). This is the data each collective must
move whatever its algorithm; NCCL's rings and trees route it over different links, but
which bytes must leave a node does not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from wlora_dist.planning.memory_plan import QUANTISED, PlanInput, _4bit_bytes, _float_bytes, kept_sites, sites

ZERO_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)


@dataclass(frozen=True)
class Transfer:
    """``count`` collectives of one kind, each over ``nbytes`` (the whole tensor gathered,
    scattered or reduced), on one process group."""

    what: str  # base, adapters, gradients, other (the loss, the gates, DeepSpeed's norm)
    kind: str  # all_gather, reduce_scatter, all_reduce
    group: str  # world, shard (HSDP's shard group / the whole world), replicate, hpz
    nbytes: int
    count: int = 1


@dataclass
class StepTraffic:
    """Bytes one rank moves in one optimizer step, by what they carry."""

    inside: dict[str, float] = field(default_factory=dict)
    across: dict[str, float] = field(default_factory=dict)

    @property
    def inside_total(self) -> float:
        return sum(self.inside.values())

    @property
    def across_total(self) -> float:
        return sum(self.across.values())

    def add(self, what: str, inside: float, across: float) -> None:
        self.inside[what] = self.inside.get(what, 0.0) + inside
        self.across[what] = self.across.get(what, 0.0) + across


# ---------------------------------------------------------------- process groups and bytes


def group_members(group: str, rank: int, world: int, inp: PlanInput) -> tuple[int, ...]:
    """The global ranks of ``rank``'s group: HSDP's mesh is (replicate, shard) with the shard
    group innermost (consecutive ranks); hpZ's secondary groups are consecutive too."""
    shard = inp.backend.mesh_shape(world)[1]
    if group == "shard":
        start = rank // shard * shard
        return tuple(range(start, start + shard))
    if group == "replicate":
        return tuple(range(rank % shard, world, shard))
    if group == "hpz":
        size = min(inp.backend.hpz_size, world)
        start = rank // size * size
        return tuple(range(start, start + size))
    return tuple(range(world))


def moved(kind: str, members: Sequence[int], rank: int, gpus_per_node: int, nbytes: float) -> tuple[float, float]:
    """(inside a node, across nodes): bytes ``rank`` receives (all-gather, broadcast) or
    sends (reduce-scatter) in one collective over ``members``; an all-reduce counts twice."""
    p = len(members)
    if p <= 1:
        return 0.0, 0.0
    node = rank // gpus_per_node
    off = sum(1 for m in members if m // gpus_per_node != node)
    chunk = nbytes / p * (2 if kind == "all_reduce" else 1)
    return chunk * (p - 1 - off), chunk * off


# ---------------------------------------------------------------- parameters as gathered


def _pad(rows: int, cols: int, shards: int) -> int:
    """Elements of a (rows, cols) parameter as FSDP2 gathers it: rows padded to the shards."""
    return -(-rows // shards) * shards * cols


def _flat_pad(numel: int, shards: int) -> int:
    """Elements as ZeRO-3 gathers a parameter: its flat partition, ceil(numel / ranks) each."""
    return -(-numel // shards) * shards


def _layer_params(inp: PlanInput) -> list[tuple[int, int, int]]:
    """One decoder layer's frozen parameters as (rows, columns, bytes per element) as
    gathered: a float base in the compute dtype where FSDP2 casts it (bf16 mixed precision),
    a quantised one as stored (int8 with fp32 row scales; packed 4-bit with its absmax)."""
    s = inp.shape
    fb = _float_bytes(inp)
    out: list[tuple[int, int, int]] = []
    for _, (i, o) in s.linear_dims().items():
        if inp.base == "int8":
            out += [(o, i, 1), (o, 1, 4)]
        elif inp.base == "nf4":
            out.append((_4bit_bytes(i * o, inp), 1, 1))
        else:
            out.append((o, i, fb))
    out += [(s.hidden, 1, fb), (s.hidden, 1, fb)]  # the two RMSNorms
    return out


def _root_params(inp: PlanInput) -> dict[str, tuple[int, int, int]]:
    s, fb = inp.shape, _float_bytes(inp)
    out = {"embedding": (s.vocab, s.hidden, fb), "norm": (s.hidden, 1, fb)}
    if not s.tied:
        quantised = inp.base in QUANTISED and "lm_head" not in inp.int8_skip
        if quantised and inp.base == "int8":
            out["lm_head"] = (s.vocab, s.hidden, 1)
        elif quantised:
            out["lm_head"] = (_4bit_bytes(s.vocab * s.hidden, inp), 1, 1)
        else:
            out["lm_head"] = (s.vocab, s.hidden, fb)
    return out


def _adapter_params(inp: PlanInput, site: tuple[int, str]) -> list[tuple[int, int]]:
    i, o = inp.shape.linear_dims()[site[1]]
    return [(inp.lora_rank, i), (o, inp.lora_rank)]  # lora_A, lora_B


def _gathered_bytes(inp: PlanInput, fb: int) -> int:
    """FSDP2 gathers float parameters in the compute dtype under mixed precision (bf16 on
    GPU); otherwise as stored."""
    return 2 if inp.compute == "bf16" and fb > 1 else fb


# ---------------------------------------------------------------- each backend's collectives


def _fsdp2(inp: PlanInput, chosen: list[tuple[int, str]], micro: int) -> list[Transfer]:
    shard = inp.backend.mesh_shape(inp.world_size)[1]
    c = 2 if inp.compute == "bf16" else 4

    def gathered(params: list[tuple[int, int, int]]) -> int:
        return sum(_pad(r, k, shard) * _gathered_bytes(inp, b) for r, k, b in params)

    layer = gathered(_layer_params(inp))
    root = _root_params(inp)
    forward = layer * inp.shape.layers + gathered(list(root.values()))
    # Backward gathers a unit whose backward runs, and (prefetch) the unit before it in
    # forward order. Nothing upstream of the first adapter has a backward, unless
    # activation checkpointing makes the embedding's output require grad.
    first = 0 if inp.activation_checkpointing else min((i for i, _ in chosen), default=inp.shape.layers)
    upstream = 0 if first == 0 else gathered([root["embedding"]]) + layer * (first - 1)
    backward = forward - upstream
    out = [Transfer("base", "all_gather", "shard", forward + backward, micro)]
    adapter_elems = sum(_pad(r, k, shard) for site in chosen for r, k in _adapter_params(inp, site))
    out.append(Transfer("adapters", "all_gather", "shard", adapter_elems * c, 2 * micro))  # forward, backward
    out.append(Transfer("gradients", "reduce_scatter", "shard", adapter_elems * 4, micro))
    if shard < inp.world_size:  # HSDP: each rank's gradient shard, averaged over the replicas
        out.append(Transfer("gradients", "all_reduce", "replicate", adapter_elems * 4 // shard, micro))
    return out


def _zero3(inp: PlanInput, chosen: list[tuple[int, str]], micro: int, persistence: int) -> list[Transfer]:
    ws, c = inp.world_size, 2 if inp.compute == "bf16" else 4
    hpz = inp.backend.hpz_size > 1

    def gathered(params: list[tuple[int, int, int]], persistent: bool = False) -> int:
        return sum(_flat_pad(r * k, ws) * b for r, k, b in params if (r * k <= persistence) == persistent)

    layer = gathered(_layer_params(inp))
    root = _root_params(inp)
    head_elems = sum(r * k for name, (r, k, _) in root.items() if name != "embedding")
    layer_elems = sum(r * k for r, k, _ in _layer_params(inp))
    # The backward re-gathers every decoder layer but the last, which the reuse distance
    # (one layer) keeps while only the lm_head and final norm run between.
    regathered = inp.shape.layers - (1 if head_elems <= layer_elems else 0)
    rounds = 2 if inp.activation_checkpointing else 1  # recomputation, then the backward
    base_fwd = layer * inp.shape.layers + gathered(list(root.values()))
    base_bwd = layer * regathered * rounds
    by_layer: dict[int, int] = {}
    for site in chosen:
        by_layer[site[0]] = by_layer.get(site[0], 0) + sum(
            _flat_pad(r * k, ws) * c for r, k in _adapter_params(inp, site) if r * k > persistence
        )
    ad_fwd = sum(by_layer.values())
    last = inp.shape.layers - 1
    ad_bwd = sum(b for i, b in by_layer.items() if i != last or regathered == inp.shape.layers) * rounds
    base_group = "hpz" if hpz else "world"
    # Parameters at or under the persistence threshold stay gathered across micro-batches:
    # gathered once per optimizer step (measured; for real models these are the norms and
    # small adapters, a rounding error beside the layers).
    kept_base = gathered(_layer_params(inp), True) * inp.shape.layers + gathered(list(root.values()), True)
    kept_ad = sum(
        _flat_pad(r * k, ws) * c for site in chosen for r, k in _adapter_params(inp, site) if r * k <= persistence
    )
    out = [
        Transfer("base", "all_gather", "world", kept_base),
        Transfer("adapters", "all_gather", "world", kept_ad),
        Transfer("base", "all_gather", base_group, base_fwd + base_bwd, micro),
        Transfer("adapters", "all_gather", base_group, ad_bwd, micro),
    ]
    if hpz:  # the adapters change at the optimizer step only: later micro-batches read the node's copy
        out += [
            Transfer("adapters", "all_gather", "world", ad_fwd),
            Transfer("adapters", "all_gather", "hpz", ad_fwd, micro - 1),
        ]
    else:
        out.append(Transfer("adapters", "all_gather", "world", ad_fwd, micro))
    numel = sum(r * k for site in chosen for r, k in _adapter_params(inp, site))
    out.append(Transfer("gradients", "reduce_scatter", "world", numel * c, micro))
    return out


def step_transfers(
    inp: PlanInput,
    chosen: list[tuple[int, str]],
    gates_train: bool,
    micro_batches: int = 1,
    zero_persistence: int = ZERO_PERSISTENCE,
) -> list[Transfer]:
    """The collectives of one optimizer step of ``micro_batches`` micro-batches with the
    adapters ``chosen`` (all n in selection, the K kept after the prune event)."""
    b = inp.backend
    if b.kind == "fsdp2":
        out = _fsdp2(inp, chosen, micro_batches)
    elif b.kind == "zero" and b.zero_stage == 3:
        out = _zero3(inp, chosen, micro_batches, zero_persistence)
    else:  # the base is not sharded: only the adapters' gradients (all-reduced) move
        numel = sum(r * k for site in chosen for r, k in _adapter_params(inp, site))
        out = [Transfer("gradients", "all_reduce", "world", numel * 4, micro_batches if b.kind == "zero" else 1)]
    n = len(sites(inp))
    out.append(Transfer("other", "all_reduce", "world", 4))  # the loss
    if b.kind == "zero":
        out.append(Transfer("other", "all_reduce", "world", 8))  # DeepSpeed's gradient norm and overflow
    if gates_train:
        out.append(Transfer("other", "all_reduce", "world", 4 * n))  # the gates' gradient
        out.append(Transfer("other", "all_gather", "world", 4 * n * inp.world_size))  # bitwise check
    return out


def traffic_of(transfers: list[Transfer], inp: PlanInput, gpus_per_node: int, rank: int = 0) -> StepTraffic:
    out = StepTraffic()
    for t in transfers:
        members = group_members(t.group, rank, inp.world_size, inp)
        inside, across = moved(t.kind, members, rank, gpus_per_node, t.nbytes)
        out.add(t.what, inside * t.count, across * t.count)
    return out


@dataclass
class TrafficPlan:
    before: StepTraffic  # a selection step: n adapters, the gates training
    after: StepTraffic  # after the prune event: K adapters


def plan_traffic(inp: PlanInput, gpus_per_node: int, zero_persistence: int = ZERO_PERSISTENCE) -> TrafficPlan:
    """Rank 0's bytes per optimizer step (``inp.grad_accum`` micro-batches), before and
    after the prune event, on nodes of ``gpus_per_node`` ranks."""
    g = max(1, min(gpus_per_node, inp.world_size))
    m = inp.grad_accum
    return TrafficPlan(
        traffic_of(step_transfers(inp, sites(inp), True, m, zero_persistence), inp, g),
        traffic_of(step_transfers(inp, kept_sites(inp), False, m, zero_persistence), inp, g),
    )
