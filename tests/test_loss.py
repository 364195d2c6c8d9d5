"""train.loss_shards: the tiled cross-entropy (DeepSpeed's TiledFusedLogitsLoss) equals
transformers' ForCausalLMLoss, its value and its gradient."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from wlora_dist.config import AdapterConfig
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.loss import tiled_causal_lm_loss


@pytest.mark.parametrize("shards,num_items", [(1, None), (4, None), (7, 61)])
def test_tiled_loss_equals_transformers_loss(shards, num_items):
    torch.manual_seed(0)
    logits = torch.randn(2, 33, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 33))
    labels[0, :6] = -100  # a prompt: no loss there
    n = torch.tensor(num_items) if num_items else None
    ref = ForCausalLMLoss(logits, labels, 50, num_items_in_batch=n)
    (g_ref,) = torch.autograd.grad(ref * 0.25, logits)  # a scaled upstream gradient (grad accumulation)
    got = tiled_causal_lm_loss(shards)(logits, labels, 50, num_items_in_batch=n)
    (g_got,) = torch.autograd.grad(got * 0.25, logits)
    assert abs(float(got) - float(ref)) < 1e-6
    assert torch.allclose(g_got, g_ref, atol=1e-8, rtol=1e-5)


def test_model_with_tiled_loss_has_the_same_loss_and_adapter_gradients(tiny_model):
    batch = {"input_ids": torch.randint(0, 250, (2, 24))}
    batch["labels"] = batch["input_ids"].clone()
    results = []
    for shards in (0, 5):
        torch.manual_seed(0)
        wl = WeightLoRA.attach(type(tiny_model)(tiny_model.config).requires_grad_(False), AdapterConfig(lora_rank=4))
        wl.base_model.load_state_dict(tiny_model.state_dict(), strict=False)
        wl.init_adapters(0)
        with torch.no_grad():
            for p in wl.trainable_parameters():
                p.add_(0.01)  # B != 0: every adapter's A gets a gradient
        if shards:
            wl.base_model.loss_function = tiled_causal_lm_loss(shards)
        loss = wl.peft_model(**batch).loss
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in wl.trainable_parameters()], wl.gates.grad.clone()))
    (l0, g0, w0), (l1, g1, w1) = results
    assert abs(l0 - l1) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-4) for a, b in zip(g0, g1, strict=True))
    assert torch.allclose(w0, w1, atol=1e-7, rtol=1e-4)
