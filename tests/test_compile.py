"""train.compile: every decoder layer through torch.compile. The gates must not cost graphs
(WeightLoRA builds as many as plain peft on the same adapters, before and after the prune
event, none left eager by dynamo's recompile limit), and a compiled run trains what an
eager one does."""

from __future__ import annotations

import pytest
import torch

from wlora_dist.config import AdapterConfig
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.blocks import compile_decoder_layers
from wlora_dist.planning.shapes import ModelShape

from .helpers import train_in_process

LAYERS = 12  # past dynamo's default recompile limit (8): a graph per layer would leave 4 eager


def _model(targets=None):
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import random_llama

    shape = ModelShape(hidden=32, intermediate=64, layers=LAYERS, heads=4, kv_heads=2, vocab=128)
    model = random_llama(shape, torch.device("cpu"), torch.float32)
    cfg = AdapterConfig(lora_rank=2, lora_alpha=4, **({"target_modules": targets} if targets else {}))
    wl = WeightLoRA.attach(model, cfg)
    with torch.no_grad():
        for p in wl.trainable_parameters():
            p.normal_(0, 0.1)  # B non-zero: the gates get gradients
    return wl


def _graphs(wl, ids) -> tuple[int, float, torch.Tensor | None]:
    """(graphs dynamo built, loss, the gates' gradient) of one compiled forward / backward."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_decoder_layers(wl.base_model, backend="aot_eager")
    wl.gates.grad = None
    loss = wl.peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"], float(loss), wl.gates.grad


def _kept_names(wl) -> list[str]:
    """A kept set that gives every layer its own structure: layer i keeps the adapters of
    the linears its index picks in binary (7 linears: 12 distinct non-empty sets)."""
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [s.name for s in wl.sites if (s.layer + 1) >> kinds.index(s.kind) & 1]


@pytest.mark.inprocess
def test_gates_build_as_many_graphs_as_plain_peft_before_and_after_the_prune_event():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    wl = _model()
    eager = wl.peft_model(input_ids=ids, labels=ids).loss
    eager.backward()
    eager_grad = wl.gates.grad.clone()
    graphs, loss, grad = _graphs(wl, ids)
    plain = _model()
    plain.remove_gates()
    plain_graphs, _, _ = _graphs(plain, ids)
    assert graphs == plain_graphs <= 2  # one per layer structure (+ dynamo's dynamic retrace)
    assert loss == pytest.approx(float(eager), rel=1e-6)
    assert float(eager_grad.abs().min()) > 0
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-7)

    # After the prune event every layer keeps a different set: one graph per layer, every
    # layer compiled (12 > the default limit of 8), as many as plain peft on that set.
    kept = _kept_names(wl)
    wl.remove([s.index for s in wl.sites if s.name not in kept])
    pruned_graphs, _, pruned_grad = _graphs(wl, ids)
    plain_k = _model(targets=[n.removeprefix("model.") for n in kept])
    assert [s.name for s in plain_k.sites] == kept
    plain_k.remove_gates()
    plain_k_graphs, _, _ = _graphs(plain_k, ids)
    assert pruned_graphs == plain_k_graphs >= LAYERS
    assert int((pruned_grad != 0).sum()) == len(kept)  # the kept gates still train


@pytest.mark.launched  # inductor runs the C++ compiler
def test_a_compiled_run_trains_what_an_eager_run_does(tiny_dir, tmp_path):
    """train.compile with inductor, through the prune event: the same losses (inductor
    fuses the arithmetic differently: within 1e-5), the same kept set."""
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # no compile-worker pool to start on 2 cores
    sections = {"adapter": {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}, "train": {"max_steps": 6}}
    _, eager = train_in_process(tiny_dir, tmp_path / "eager", **sections)
    torch._dynamo.reset()
    sections["train"] = {"max_steps": 6, "compile": True}
    trainer, compiled = train_in_process(tiny_dir, tmp_path / "compiled", **sections)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in trainer.wl.base_model.model.layers)
    assert compiled.kept == eager.kept and len(compiled.kept) == 4
    e, c = [h["loss"] for h in eager.history], [h["loss"] for h in compiled.history]
    assert c == pytest.approx(e, rel=1e-5)
    assert compiled.eval_loss == pytest.approx(eager.eval_loss, rel=1e-5)
