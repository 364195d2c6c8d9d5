"""The names tensors have in a checkpoint, spelled here and nowhere else. Each stateful part
hands over its tensors under its own short names (the backend: each adapter matrix's
weight and AdamW state; the selector: the gate vector); this module puts each part under
its namespace:

    adapter.<site>.lora_A           an adapter matrix, e.g. adapter.model.layers.0.self_attn.q_proj.lora_A
    optim.<site>.lora_A.exp_avg     its AdamW state: .exp_avg, .exp_avg_sq, .step
    wlora.gates                     the selector's gate vector (index i: the run's i-th site)

The names depend on neither the backend nor the world size: a checkpoint any run writes,
any run reads (the storage reshards), and ``wlora-dist export`` reads the same names.
"""

from __future__ import annotations

import torch

from wlora_dist.distributed.base import ADAPTER_WEIGHT, AdapterState

ADAPTER = "adapter"  # the backend's adapter weights
OPTIM = "optim"  # the backend's AdamW state of each
SELECTOR = "wlora"  # the selector's tensors: the gates
GATES = f"{SELECTOR}.gates"


def matrix_names(site: str) -> tuple[str, str]:
    """The names of a site's two adapter matrices (A, B) in a checkpoint."""
    return f"{site}.lora_A", f"{site}.lora_B"


def adapter_key(matrix: str) -> str:
    return f"{ADAPTER}.{matrix}"


def flatten(adapters: dict[str, AdapterState], selector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every part's tensors under its checkpoint name (the same tensor objects: a load fills
    them in place)."""
    out: dict[str, torch.Tensor] = {}
    for matrix, state in adapters.items():
        out[adapter_key(matrix)] = state[ADAPTER_WEIGHT]
        out.update({f"{OPTIM}.{matrix}.{k}": t for k, t in state.items() if k != ADAPTER_WEIGHT})
    out.update({f"{SELECTOR}.{k}": t for k, t in selector.items()})
    return out
