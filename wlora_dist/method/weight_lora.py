"""WeightLoRA on a transformers model: peft LoRA adapters plus one gate vector.

    x ──► W_i (frozen) ───────────────────────────► (+) ──► h
    └───► dropout ─► A_i (r x in) ─► × w_i ─► B_i (out x r) ─► × alpha/r ─┘

peft injects and runs the adapters (init, dropout, scaling, its bitsandbytes layers);
this module adds what peft does not have: the gate vector ``w`` (n floats, one per
adapter, in a fixed order by module name) applied by a forward hook on each ``lora_A``,
and the physical removal of adapters whose gate is 0.

The hooks are one function that reads its gate from the module (``lora_A.wlora_gate``, a
view of w[i] made once per model forward by a pre-hook on the input embeddings), not a
closure over the index i: ``torch.compile`` guards on a Python integer, so a closure per
index made dynamo compile every decoder layer again (8 graphs for 12 layers, then its
recompile limit); a tensor read from the module is a graph input, and every layer with
the same adapters shares one graph, as with plain peft.

w_i B_i A_i x = B_i (w_i A_i x): the gate multiplies A's r-wide output, not B's
out-wide one, because the product keeps its other factor for w_i's gradient. On B's
output that was a tensor of every adapter's output width per token (10.5 GiB at Llama-3
8B, 224 adapters, 2 x 2048 tokens, bf16: the selection phase's whole extra memory,
wlora_dist/planning/memory_plan.py); on A's it is r per token.

``w`` is deliberately *not* a parameter of the model: FSDP2 / ZeRO never see it, so it
is never sharded or partitioned; the trainer all-reduces its gradient by hand.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from wlora_dist.config import AdapterConfig, ConfigError
from wlora_dist.method.init import initial_adapter_weights

ADAPTER = "default"  # the peft adapter name we use
_LAYER_RE = re.compile(r"\blayers\.(\d+)\.")


def natural_key(name: str) -> tuple:
    """Sort key that orders 'layers.2' before 'layers.10'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class AdapterSite:
    """One adapter: its index in w, module path (relative to the base model), layer, kind."""

    index: int
    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    layer: int | None  # decoder layer index, if the name has one
    kind: str  # last name component, e.g. "q_proj"


def is_target(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    """peft's rule: a module is a target when its name equals an entry or ends with "." +
    the entry; so ``q_proj`` names every q_proj and ``layers.3.mlp.down_proj`` one linear."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Full names of the linears that get an adapter, in canonical (natural-sort) order."""
    found = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if cfg.include_lm_head and kind == "lm_head" and _is_linear(module):
            found.append(name)  # the output head: no decoder layer, so adapter.layers does not apply
            continue
        if not is_target(name, cfg.target_modules) or not _is_linear(module):
            continue
        m = _LAYER_RE.search(name)
        layer = int(m.group(1)) if m else None
        if cfg.layers is not None and layer not in cfg.layers:
            continue
        found.append(name)
    if not found:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        config = getattr(model, "config", None)
        arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        model_type = getattr(config, "model_type", None)
        raise ConfigError(
            [
                f"adapter.target_modules={cfg.target_modules} with adapter.layers={cfg.layers} matches no "
                f"linear layer of this model ({arch}{f', model_type {model_type!r}' if model_type else ''}); its "
                f"linear names are {kinds}. wlora_dist targets Llama-architecture models (q_proj, k_proj, v_proj, "
                "o_proj, gate_proj, up_proj, down_proj); for another architecture name its nn.Linear modules"
            ],
            "adapter",
        )
    return sorted(found, key=natural_key)


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear, so they count too.
    return isinstance(module, nn.Linear)


class WeightLoRA:
    """A peft LoRA model with one gate per adapter, and the prune event.

    Attributes:
        peft_model: the ``PeftModel`` (adapters of removed sites are gone from its tree).
        sites: all n adapter sites, index i <-> w[i]; never changes.
        gates: w, float32 vector of n, requires_grad while the selection phase runs.
        kept: bool vector of n; False once a site is physically removed.
    """

    def __init__(self, peft_model: PeftModel, sites: list[AdapterSite], lora_config: LoraConfig) -> None:
        self.peft_model = peft_model
        self.sites = sites
        self.lora_config = lora_config
        device = next(peft_model.parameters()).device
        if device.type == "meta":  # a model built on meta is materialised later; w is tiny
            device = torch.device("cpu")
        self.gates = torch.ones(len(sites), dtype=torch.float32, device=device, requires_grad=True)
        self.kept = torch.ones(len(sites), dtype=torch.bool)
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._gated: dict[int, nn.Module] = {}  # index -> the lora_A its gate hook is on
        for site in sites:
            self._gate(site, self.lora_layer(site).lora_A[ADAPTER])
        # Every forward enters through the input embeddings (peft's forward and generate
        # alike): the per-adapter views of w are made there, once per model forward.
        self._views_hook = self.base_model.get_input_embeddings().register_forward_pre_hook(self._gate_views)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def attach(cls, model: nn.Module, cfg: AdapterConfig) -> WeightLoRA:
        """Inject LoRA adapters with peft and attach the gate vector (all gates 1)."""
        names = find_target_modules(model, cfg)
        lora_config = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            target_modules=names,  # exact names: peft matches a full name exactly
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora_config)
        sites = []
        for i, name in enumerate(names):
            m = _LAYER_RE.search(name)
            sites.append(AdapterSite(i, name, int(m.group(1)) if m else None, name.rsplit(".", 1)[-1]))
        return cls(peft_model, sites, lora_config)

    def init_adapters(
        self,
        seed: int,
        assign: Callable[[nn.Parameter, torch.Tensor], None] | None = None,
        full_shape: Callable[[nn.Parameter], torch.Size] | None = None,
        kept_only: bool = False,
    ) -> None:
        """The one adapter-init path (``method/init.py`` values): every adapter, or the kept
        ones (the re-initialisation at the prune event). ``assign`` writes a full value into
        a possibly sharded parameter (a backend's ``assign_full``; default: copy), and
        ``full_shape`` gives its unsharded shape (default: its shape)."""
        assign = assign or _copy_full
        full_shape = full_shape or (lambda p: p.shape)
        with torch.no_grad():
            for site in self.kept_sites() if kept_only else self.sites:
                a, b = self.adapter_params(site)
                a_init, b_init = initial_adapter_weights(site.index, full_shape(a), full_shape(b), seed)
                assign(a, a_init)
                assign(b, b_init)

    def _gate(self, site: AdapterSite, lora_a: nn.Module) -> None:
        """Gate adapter ``site`` through its ``lora_A`` module (the shared hook; a view of
        w[i] until the next forward makes a new one)."""
        self._ungate(site.index)
        lora_a.wlora_gate = self.gates[site.index]
        self._gated[site.index] = lora_a
        self._hooks[site.index] = lora_a.register_forward_hook(_apply_gate)

    def _ungate(self, index: int) -> None:
        if index in self._hooks:
            self._hooks.pop(index).remove()
            del self._gated.pop(index).wlora_gate

    def _gate_views(self, module: nn.Module, args: tuple) -> None:
        """Once per model forward, before any adapter runs: each gated lora_A gets its view
        of w (one unbind: w's gradient flows back through these views)."""
        views = self.gates.unbind(0)
        for index, lora_a in self._gated.items():
            lora_a.wlora_gate = views[index]

    # -- access -----------------------------------------------------------------------

    @property
    def n(self) -> int:
        return len(self.sites)

    @property
    def base_model(self) -> nn.Module:
        """The transformers model inside peft (module names relative to it)."""
        return self.peft_model.base_model.model

    def lora_layer(self, site: AdapterSite) -> LoraLayer:
        module = self.base_model.get_submodule(site.name)
        if not isinstance(module, LoraLayer):
            raise KeyError(f"adapter {site.name} was removed")
        return module

    def kept_sites(self) -> list[AdapterSite]:
        return [s for s in self.sites if bool(self.kept[s.index])]

    def adapter_params(self, site: AdapterSite) -> list[nn.Parameter]:
        layer = self.lora_layer(site)
        return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' A and B of kept sites, in site order (not named_parameters order)."""
        return [p for s in self.kept_sites() for p in self.adapter_params(s)]

    def lora_rank(self, site: AdapterSite) -> int:
        return int(self.lora_layer(site).r[ADAPTER])

    # -- the prune event --------------------------------------------------------------

    def remove_gates(self) -> None:
        """Plain peft LoRA from here on: the gate hooks are removed and w frozen (the
        benchmarks' baselines)."""
        for index in list(self._hooks):
            self._ungate(index)
        self._views_hook.remove()
        self.freeze_gates()

    def freeze_gates(self) -> None:
        self.gates.requires_grad_(False)
        self.gates.grad = None

    def fold_gates_into_B(self) -> None:
        """B_i <- w_i * B_i and w_i <- 1 for every kept adapter; outputs stay the same."""
        with torch.no_grad():
            for s in self.kept_sites():
                self.lora_layer(s).lora_B[ADAPTER].weight.mul_(self.gates[s.index].to(torch.float32))
                self.gates[s.index] = 1.0

    def remove(self, indices: list[int]) -> list[nn.Parameter]:
        """Physically remove adapters: the LoraLayer is replaced by its frozen base layer.

        Returns the removed parameters (for the caller to drop from the optimizer and,
        in tests, to prove freed via weak references).
        """
        removed: list[nn.Parameter] = []
        for i in indices:
            site = self.sites[i]
            layer = self.lora_layer(site)
            removed += self.adapter_params(site)
            self._ungate(i)
            parent_name, _, child = site.name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), child, layer.get_base_layer())
            # Drop the adapter submodules so nothing reachable from the layer holds them.
            for container in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                if ADAPTER in container:
                    del container[ADAPTER]
            self.kept[i] = False
        # Keep peft's own bookkeeping true, so its save/load paths see the kept set only.
        self.peft_model.peft_config[ADAPTER].target_modules = {s.name for s in self.kept_sites()}
        return removed

    def replace_adapter(self, site: AdapterSite, a: torch.Tensor, b: torch.Tensor) -> list[nn.Parameter]:
        """Give a kept adapter new A (r' x in) and B (out x r') of any rank r', as new
        modules (the caller's backend shards / wraps them); its scaling alpha/r stays what it
        was (the export writes alpha_pattern accordingly). Returns the old parameters."""
        layer = self.lora_layer(site)
        old = self.adapter_params(site)
        device = a.device
        rank = a.shape[0]
        new_a = nn.Linear(a.shape[1], rank, bias=False, device=device, dtype=torch.float32)
        new_b = nn.Linear(rank, b.shape[0], bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            new_a.weight.copy_(a)
            new_b.weight.copy_(b)
        layer.lora_A[ADAPTER] = new_a
        layer.lora_B[ADAPTER] = new_b
        layer.r[ADAPTER] = rank
        self._gate(site, new_a)
        return old

    # -- export -------------------------------------------------------------------------

    def export_state(
        self, gather: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Kept adapters as a peft state dict, with w folded into B (B' = w * B).

        ``gather`` turns sharded tensors into full ones (the backend's ``gather_full``, a
        collective under FSDP2 / ZeRO-3: every rank must call this).
        """
        gather = gather or (lambda ts: ts)
        out = {}
        for s in self.kept_sites():
            a, b = (t.detach() for t in gather(self.adapter_params(s)))
            out.update(peft_entries(s.name, a, b, self.gates[s.index].detach().to(torch.float32)))
        return out

    def export_config(self, base_model_name_or_path: str) -> LoraConfig:
        """A peft LoraConfig naming exactly the kept modules (rank_pattern where ranks differ)."""
        kept = self.kept_sites()
        ranks = {s.name: self.lora_rank(s) for s in kept}
        main_rank, alpha = self.lora_config.r, self.lora_config.lora_alpha
        rank_pattern = {name: r for name, r in ranks.items() if r != main_rank}
        # alpha_i = scaling_i * r_i (rsLoRA: * sqrt(r_i)) keeps each adapter's trained scaling.
        rs = bool(self.lora_config.use_rslora)
        alphas = {
            s.name: float(self.lora_layer(s).scaling[ADAPTER]) * (math.sqrt(ranks[s.name]) if rs else ranks[s.name])
            for s in kept
        }
        alpha_pattern = {name: a for name, a in alphas.items() if abs(a - alpha) > 1e-9 * max(1.0, alpha)}
        return LoraConfig(
            r=main_rank,
            lora_alpha=alpha,
            lora_dropout=self.lora_config.lora_dropout,
            use_rslora=rs,
            target_modules=sorted(ranks, key=natural_key),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
            inference_mode=True,  # a finished adapter, as peft saves one
        )


def _apply_gate(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """peft computes lora_B(lora_A(dropout(x))) * scaling; this scales lora_A's output by
    w_i. With w_i == 1 it is bitwise plain peft LoRA (x * 1.0 == x)."""
    return output * module.wlora_gate.to(output.dtype)


def _copy_full(param: nn.Parameter, value: torch.Tensor) -> None:
    param.copy_(value)


def peft_entries(site: str, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One kept adapter under peft's state-dict names, its gate folded into B (B' = w * B):
    what the trainer's export and ``wlora-dist export`` of a checkpoint both write."""
    key = f"base_model.model.{site}"
    return {
        f"{key}.lora_A.weight": a.float().cpu().contiguous(),
        f"{key}.lora_B.weight": (b.float() * w).cpu().contiguous(),
    }
