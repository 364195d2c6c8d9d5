"""Does a compiled decoder layer give the eager losses and gate gradients, and how many
graphs does dynamo build for L layers? One graph shared by every layer is what makes
compiling a 32-layer model cheap; one per layer runs into dynamo's recompile limit
(``torch._dynamo.config.recompile_limit``, 8) and the layers past it stay eager. Layers
are compiled as train.compile compiles them (wlora_dist/model/blocks.py, which raises the
limit to the number of layers); B is drawn non-zero so the gates get gradients.

    python -m benchmarks.compile_probe            # about 30 s on 2 CPU cores (inductor)
    python -m benchmarks.compile_probe --plain    # the same without the gate hooks
    python -m benchmarks.compile_probe --layers 2 --device cuda

docs/compile_probe.json holds both at 12 layers, as a JSON list, each run with a cold inductor
cache (TORCHINDUCTOR_CACHE_DIR set to a new empty folder).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def probe(layers: int, device: str, plain: bool = False) -> dict:
    """``plain``: the gate hooks removed (plain peft LoRA), to tell what they cost."""
    import torch._dynamo

    from benchmarks.harness import random_llama
    from wlora_dist.config.adapter import AdapterConfig
    from wlora_dist.method.weight_lora import WeightLoRA
    from wlora_dist.model.blocks import compile_decoder_layers
    from wlora_dist.planning.shapes import ModelShape

    shape = ModelShape(hidden=64, intermediate=128, layers=layers, heads=4, kv_heads=2, vocab=256)
    model = random_llama(shape, torch.device(device), torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    wl = WeightLoRA.attach(model, AdapterConfig(lora_rank=4, lora_alpha=8))
    with torch.no_grad():
        for p in wl.trainable_parameters():
            p.normal_(0, 0.1)  # B non-zero: the gates get gradients
    if plain:
        wl.remove_gates()
    ids = torch.randint(0, shape.vocab, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> tuple[float, torch.Tensor]:
        wl.gates.grad = None
        loss = wl.peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad = wl.gates.grad if wl.gates.grad is not None else torch.zeros(1)
        return loss.item(), grad.clone()

    eager_loss, eager_grad = step()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    limit = torch._dynamo.config.recompile_limit
    compile_decoder_layers(model)
    t0 = time.perf_counter()
    loss, grad = step()
    first = time.perf_counter() - t0
    return {
        "layers": layers,
        "gates": not plain,
        "device": device,
        "eager_loss": eager_loss,
        "compiled_loss": loss,
        "max_gate_grad_diff": (grad - eager_grad).abs().max().item(),
        "max_gate_grad": eager_grad.abs().max().item(),
        "unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "first_compiled_step_s": round(first, 1),
        "recompile_limit": {"default": limit, "as compiled": torch._dynamo.config.recompile_limit},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plain", action="store_true", help="without the gate hooks (plain peft LoRA)")
    args = ap.parse_args(argv)
    print(json.dumps(probe(args.layers, args.device, args.plain), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
