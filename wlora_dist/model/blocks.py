"""The repeated decoder blocks of a causal LM, and ``train.compile``'s compilation of them.

Each block is compiled with ``torch.compile`` (inductor) on its own, the way torchtune and
torchtitan compile a transformer: one graph serves every block of the same structure, and
the embedding, the loss and the collectives between blocks stay eager.

Before the prune event every block has the same adapters: one graph, as with plain peft
(the gate hooks read their gate from a tensor on each module instead of closing over an
index, method/weight_lora.py). After it, blocks differ in which linears kept an adapter,
so up to one graph per block is built; dynamo's recompile limit (8 per code object by
default) would leave the blocks past it eager, so it is raised to the number of blocks.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a causal LM (``model.model.layers``): FSDP2's units,
    ZeRO-3's gathering granularity, what train.compile compiles."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: expected a decoder-only model with model.layers (Llama-like)")
    return list(layers)


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder block of ``model`` in place (``nn.Module.compile``: from its
    next call the block runs compiled, its hooks included). Returns how many. ``backend``:
    torch.compile's (tests count graphs with the cheaper "aot_eager")."""
    import torch._dynamo

    layers = decoder_layers(model)
    # Graphs = distinct block structures (at most one per block); + 2: the first graph and
    # dynamo's automatic-dynamic retrace of it.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, len(layers) + 2)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
