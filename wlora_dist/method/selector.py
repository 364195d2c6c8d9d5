"""The selector: WeightLoRA's method on a live model, one object.

It owns the gate update of the selection phase (all-reduced gradient, SGD step and
projection, bitwise the same on every rank) and the one event that changes the adapter
layout. A WeightLoRA+ round, the final prune event and the replay of either on resume are
the same ``LayoutChange`` with other values:

    check the gates agree -> fold w into B? -> freeze w? -> remove the dropped adapters
      -> new ranks for the kept (WeightLoRA+ extension, or empty ones a checkpoint fills)
      -> re-initialise the kept? -> the backend: "adapters changed, keep or reset state"

No torch.distributed here: collectives come in through ``ReplicaSync`` and the backend
through ``AdapterStore`` (both implemented in wlora_dist.distributed).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from wlora_dist.config import SelectionConfig
from wlora_dist.method.extension import double_rank
from wlora_dist.method.gates import gate_step
from wlora_dist.method.init import derive_seed
from wlora_dist.method.schedule import in_selection, is_projection_step, is_prune_step, round_index, round_k
from wlora_dist.method.weight_lora import AdapterSite, WeightLoRA


class ReplicaSync(Protocol):
    """The collectives the replicated gate vector needs."""

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def check_same(self, tensor: torch.Tensor, what: str) -> None: ...


class AdapterStore(Protocol):
    """What the selector needs of a backend (wlora_dist.distributed.base.Backend)."""

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def assign_full(self, param: nn.Parameter, value: torch.Tensor) -> None: ...

    def full_shape(self, param: torch.Tensor) -> torch.Size: ...

    def adapters_changed(self, wl: WeightLoRA, replaced: list[AdapterSite], keep_state: bool) -> None: ...


@dataclass(frozen=True)
class LayoutChange:
    """One change of the adapter layout."""

    kind: Literal["round", "prune", "resume"]
    step: int  # the optimizer step it follows
    drop: tuple[int, ...]  # indices of the adapters removed
    new_ranks: dict[int, int] = field(default_factory=dict)  # kept adapter index -> its new LoRA rank
    extend: bool = True  # new ranks by the WeightLoRA+ extension (else empty: a checkpoint fills them)
    round_: int = 0  # the WeightLoRA+ round whose extension this is
    fold: bool = False  # fold w into B first (selection.fold_gates)
    freeze: bool = False  # the gates stop training (the prune event)
    reinit: bool = False  # fresh A, zero B for the kept adapters (selection.reinit_kept)
    keep_state: bool = True  # Adam state carried over for unchanged adapters
    reset_optimizer: bool = False  # a fresh AdamW even where nothing else changes (selection.reset_optimizer)

    @property
    def changes_modules(self) -> bool:
        return bool(self.drop or self.new_ranks or self.reinit or self.reset_optimizer)


@dataclass
class LayoutEvent:
    """What a LayoutChange did."""

    change: LayoutChange
    kept: list[str]
    rank: int  # LoRA rank of the kept adapters (0 when none is kept)
    removed: list[weakref.ref] = field(default_factory=list)  # the removed A / B tensors (dead once freed)
    probe_losses: tuple[float, float] | None = None  # the trainer's probe loss before / after
    seconds: float = 0.0  # wall time of the change, as the trainer measured it (probe losses included)
    layout_seconds: float = 0.0  # of which the layout change itself: the selector, the backend rebuild, the re-plan


class Selector:
    """WeightLoRA's gates and layout changes over ``wl`` under ``cfg`` (selection.*)."""

    def __init__(self, wl: WeightLoRA, cfg: SelectionConfig, seed: int, sync: ReplicaSync) -> None:
        self.wl = wl
        self.cfg = cfg
        self.seed = seed
        self.sync = sync
        self.pruned = False

    # -- the selection phase -----------------------------------------------------------

    def trains_gates(self, optimizer_step: int) -> bool:
        return in_selection(optimizer_step, self.cfg)

    def reduce_gate_grad(self) -> torch.Tensor:
        """After backward, once per step and before update_gates: the gate gradient becomes
        its mean over ranks, in place (w is replicated: every rank then takes the same
        step). Returned, for selection.clip_gates' norm over adapters and gates."""
        grad = self.wl.gates.grad
        assert grad is not None
        self.sync.mean_(grad)
        return grad

    def update_gates(
        self, optimizer_step: int, lr_w: float, clip: tuple[float, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """w <- P(w - lr_w grad_w), from the gradient reduce_gate_grad averaged over ranks.
        ``clip``: (max_norm, the norm over adapters and gates): the gradient is scaled as
        torch's clip_grad_norm_ scales every gradient it clips together."""
        wl, sel = self.wl, self.cfg
        assert wl.gates.grad is not None
        if clip is not None and clip[0] > 0:
            max_norm, total = clip
            coef = torch.clamp(max_norm / (total.to(wl.gates.grad) + 1e-6), max=1.0)
            wl.gates.grad.mul_(coef)
        round_ = round_index(optimizer_step, sel)
        result = gate_step(
            wl.gates,
            wl.gates.grad,
            lr_w,
            sel,
            is_projection_step(optimizer_step, sel),
            force_projection=is_prune_step(optimizer_step, sel) or round_ > 0,
            k=round_k(wl.n, round_) if round_ else None,
        )
        with torch.no_grad():
            wl.gates.copy_(result.gates)
        wl.gates.grad = None
        if result.projected:
            self.sync.check_same(wl.gates, "gate vector w")  # cheap: n floats
        return {"gate_grad_norm": result.grad_norm, "gates_nonzero": int((wl.gates != 0).sum())}

    # -- layout changes ----------------------------------------------------------------

    def change_at(self, optimizer_step: int) -> LayoutChange | None:
        """The layout change the schedule puts after ``optimizer_step``, if any."""
        sel, wl = self.cfg, self.wl
        final = is_prune_step(optimizer_step, sel)
        round_ = sel.rounds if final else round_index(optimizer_step, sel)
        if not (final or round_):
            return None
        gates = wl.gates.detach()
        drop = tuple(s.index for s in wl.kept_sites() if float(gates[s.index]) == 0.0)
        kept = [s for s in wl.kept_sites() if s.index not in drop]
        new_ranks = {s.index: 2 * wl.lora_rank(s) for s in kept} if round_ else {}
        reinit = final and sel.reinit_kept
        return LayoutChange(
            kind="prune" if final else "round",
            step=optimizer_step,
            drop=drop,
            new_ranks=new_ranks,
            round_=round_,
            fold=final and sel.fold_gates,
            freeze=final,
            reinit=reinit,
            # re-initialised, extended or asked for: fresh Adam state
            keep_state=not (reinit or new_ranks or (final and sel.reset_optimizer)),
            reset_optimizer=final and sel.reset_optimizer,
        )

    # -- its part of a checkpoint ----------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The selector's tensors in a checkpoint: the gate vector (the same on every rank)."""
        return {"gates": self.wl.gates.detach()}

    def layout(self) -> dict[str, Any]:
        """The adapter layout a checkpoint records: the phase, the kept adapters in site
        order, and each one's LoRA rank (WeightLoRA+ doubles them)."""
        kept = self.wl.kept_sites()
        return {
            "pruned": self.pruned,
            "kept": [s.name for s in kept],
            "ranks": {s.name: self.wl.lora_rank(s) for s in kept},
        }

    def restore_layout(
        self, step: int, kept: list[str], ranks: dict[str, int], pruned: bool, store: AdapterStore
    ) -> LayoutEvent:
        """A freshly set-up model brought to a checkpoint's layout (its values are loaded after)."""
        return self.apply(self.resume_change(step, kept, ranks, pruned), store)

    def resume_change(self, step: int, kept: list[str], ranks: dict[str, int], pruned: bool) -> LayoutChange:
        """The layout of a checkpoint, on this freshly set-up model: the same removal, and
        empty adapters of the saved ranks (the checkpoint's values fill them)."""
        wl, keep = self.wl, set(kept)
        drop = tuple(s.index for s in wl.sites if s.name not in keep)
        new_ranks = {
            s.index: ranks[s.name]
            for s in wl.sites
            if s.name in keep and ranks.get(s.name, wl.lora_rank(s)) != wl.lora_rank(s)
        }
        return LayoutChange("resume", step, drop, new_ranks, extend=False, freeze=pruned, keep_state=False)

    def apply(self, change: LayoutChange, store: AdapterStore) -> LayoutEvent:
        """Carry ``change`` out on every rank (the backend is told when modules changed);
        returns what it did."""
        wl = self.wl
        self.sync.check_same(wl.gates, f"gate vector w at the {change.kind} of step {change.step}")
        if change.fold:
            wl.fold_gates_into_B()
        if change.freeze:
            wl.freeze_gates()
            self.pruned = True
        removed = wl.remove(list(change.drop))
        replaced = [wl.sites[i] for i in sorted(change.new_ranks)]
        for site in replaced:
            a, b = self._new_rank(site, change, store)
            removed += wl.replace_adapter(site, a, b)
        if change.reinit:
            # Another run seed than the first init's (seed + 1): new values, the same on every rank.
            wl.init_adapters(self.seed + 1, store.assign_full, store.full_shape, kept_only=True)
        if change.changes_modules:
            store.adapters_changed(wl, replaced, change.keep_state)
        kept = wl.kept_sites()
        event = LayoutEvent(change, [s.name for s in kept], wl.lora_rank(kept[0]) if kept else 0)
        event.removed = [weakref.ref(p) for p in removed]
        return event

    def _new_rank(
        self, site: AdapterSite, change: LayoutChange, store: AdapterStore
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of ``site`` at its new rank: the extension of its current values, the same
        on every rank (gathered, extended in full with a generator seeded by (seed, adapter,
        round)); or zeros a checkpoint then fills."""
        a, b = self.wl.adapter_params(site)
        device = self.wl.gates.device
        rank = change.new_ranks[site.index]
        if not change.extend:
            return (
                torch.zeros(rank, store.full_shape(a)[1], device=device),
                torch.zeros(store.full_shape(b)[0], rank, device=device),
            )
        a_full, b_full = (t.detach() for t in store.gather_full([a, b]))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, adapter=site.index, round_=change.round_))
        a2, b2 = double_rank(a_full, b_full, self.cfg.extension, gen)
        return a2.to(device), b2.to(device)


def fit_problems(wl: WeightLoRA, cfg: SelectionConfig, lora_rank: int) -> list[str]:
    """What only the model can tell about selection.*: K against n, and whether the
    WeightLoRA+ rounds leave adapters and fit their doubled ranks. One line per problem."""
    problems = []
    if cfg.method == "topk" and isinstance(cfg.k, int) and cfg.k > wl.n:  # a share of n always fits
        problems.append(
            f"selection.k: {cfg.k} exceeds the {wl.n} adapters that adapter.target_modules / adapter.layers "
            f"give on this model; choose k in [1, {wl.n}], or a share of them (e.g. 0.25)"
        )
    if not cfg.rounds:
        return problems
    final = lora_rank << cfg.rounds
    if wl.n >> cfg.rounds < 1:
        problems.append(f"selection.rounds: {cfg.rounds} halvings of n={wl.n} adapters leave none")
    narrow = [s.name for s in wl.sites if wl.lora_layer(s).in_features < final]
    if narrow:
        problems.append(
            f"selection.rounds: {cfg.rounds} doublings of adapter.lora_rank={lora_rank} reach rank {final}, more "
            f"than the {len(narrow)} adapter(s) with fewer inputs can hold (e.g. {narrow[0]}); lower one of them"
        )
    return problems
