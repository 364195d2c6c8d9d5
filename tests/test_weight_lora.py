"""WeightLoRA on peft: exactness against peft LoRA, gate gradients, removal, export."""

import copy
import gc
import weakref

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from wlora_dist.checkpoint.peft import save_peft_adapter
from wlora_dist.config import LLAMA_LINEARS, AdapterConfig, ConfigError
from wlora_dist.method.weight_lora import ADAPTER, WeightLoRA, natural_key

CFG = AdapterConfig(lora_rank=4, lora_alpha=8.0)


def _batch(seed=0, vocab=259):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (2, 12), generator=g)
    return {"input_ids": x, "labels": x}


def _randomize_B(model, seed=1):
    """B = 0 at init makes every adapter a no-op; give them values so checks bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_sites_in_natural_name_order_and_all_linears(tiny_model):
    wl = WeightLoRA.attach(tiny_model, CFG)
    names = [s.name for s in wl.sites]
    assert wl.n == 14  # 7 linears x 2 layers
    assert names == sorted(names, key=natural_key)
    assert [s.index for s in wl.sites] == list(range(14))
    assert {s.kind for s in wl.sites} == set(LLAMA_LINEARS)  # the default targets a Llama has
    assert names[0] == "model.layers.0.mlp.down_proj"


def test_layers_and_modules_filter(tiny_model):
    wl = WeightLoRA.attach(tiny_model, AdapterConfig(lora_rank=2, target_modules=["q_proj", "v_proj"], layers=[1]))
    assert [s.name for s in wl.sites] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_target_modules_matching_nothing_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match=r"adapter.target_modules=\['qkv'\].*linear names are"):
        WeightLoRA.attach(tiny_model, AdapterConfig(target_modules=["qkv"]))


def test_all_gates_one_is_exactly_peft_lora(tiny_model):
    reference = get_peft_model(
        copy.deepcopy(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=CFG.target_modules, task_type="CAUSAL_LM"),
    )
    wl = WeightLoRA.attach(tiny_model, CFG)
    _randomize_B(reference)
    # Same adapter weights in both (copied by name: both are peft's own modules).
    wl.peft_model.load_state_dict(reference.state_dict())
    batch = _batch()
    out_ref = reference(**batch)
    out = wl.peft_model(**batch)
    assert torch.equal(out.logits, out_ref.logits)  # bitwise: w * x with w == 1
    out_ref.loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in wl.peft_model.named_parameters() if p.requires_grad}
    assert ref_grads.keys() == grads.keys() and len(grads) == 28
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    assert wl.gates.grad is not None and wl.gates.grad.abs().sum() > 0


def test_gate_gradient_matches_finite_difference(tiny_model):
    tiny_model.double()
    wl = WeightLoRA.attach(tiny_model, CFG)
    _randomize_B(wl.peft_model)
    with torch.no_grad():
        wl.gates.copy_(torch.linspace(0.5, 1.5, wl.n, dtype=torch.float32))
    batch = _batch()
    wl.peft_model(**batch).loss.backward()
    grad = wl.gates.grad.clone()
    for i in (0, 5, 13):
        eps = 1e-3
        with torch.no_grad():
            wl.gates[i] += eps
            up = wl.peft_model(**batch).loss.item()
            wl.gates[i] -= 2 * eps
            down = wl.peft_model(**batch).loss.item()
            wl.gates[i] += eps
        assert abs((up - down) / (2 * eps) - grad[i].item()) < 1e-3 * max(1.0, abs(grad[i].item()))


def test_zero_gate_equals_removed_adapter_and_removal_frees_tensors(tiny_model):
    wl = WeightLoRA.attach(tiny_model, CFG)
    _randomize_B(wl.peft_model)
    drop = [0, 3, 7, 8]
    with torch.no_grad():
        wl.gates[drop] = 0.0
    batch = _batch()
    opt = torch.optim.AdamW(wl.trainable_parameters(), lr=1e-3)
    wl.peft_model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = wl.peft_model(**batch).logits.detach()
    n_params_before = len(wl.trainable_parameters())

    removed = wl.remove(drop)
    refs = [weakref.ref(p) for p in removed]
    kept_params = wl.trainable_parameters()
    new_opt = torch.optim.AdamW(kept_params, lr=1e-3)
    for p in kept_params:
        new_opt.state[p] = opt.state[p]
    del removed, opt, p
    gc.collect()
    assert [r() is None for r in refs] == [True] * 8, "removed adapter tensors are still alive"

    assert len(kept_params) == n_params_before - 8
    live = {id(p) for p in wl.peft_model.parameters() if p.requires_grad}
    assert live == {id(p) for p in kept_params}
    for i in drop:
        site = wl.sites[i]
        assert not hasattr(wl.base_model.get_submodule(site.name), "lora_A")
        with pytest.raises(KeyError):
            wl.lora_layer(site)
    assert sorted(wl.peft_model.peft_config[ADAPTER].target_modules) == sorted(s.name for s in wl.kept_sites())
    # Continuity: the pruned model computes what the gated model computed.
    after = wl.peft_model(**batch).logits.detach()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_fold_gates_keeps_outputs(tiny_model):
    wl = WeightLoRA.attach(tiny_model, CFG)
    _randomize_B(wl.peft_model)
    with torch.no_grad():
        wl.gates.copy_(torch.linspace(-1, 2, wl.n))
    batch = _batch()
    before = wl.peft_model(**batch).logits.detach()
    wl.fold_gates_into_B()
    assert torch.all(wl.gates == 1)
    torch.testing.assert_close(wl.peft_model(**batch).logits.detach(), before, rtol=1e-5, atol=1e-5)


def test_export_loads_with_peft_and_reproduces_outputs(tiny_model, tmp_path):
    base_copy = copy.deepcopy(tiny_model)
    wl = WeightLoRA.attach(tiny_model, CFG)
    _randomize_B(wl.peft_model)
    with torch.no_grad():
        wl.gates.copy_(torch.linspace(0.2, 1.8, wl.n))
        wl.gates[[1, 2, 9]] = 0.0
    wl.remove([1, 2, 9])
    batch = _batch(3)
    expected = wl.peft_model(**batch).logits.detach()

    out = save_peft_adapter(wl.export_state(), wl, tmp_path / "adapter", "tiny")
    loaded = PeftModel.from_pretrained(base_copy, str(out))
    got = loaded(**batch).logits.detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cfg = LoraConfig.from_pretrained(str(out))
    assert sorted(cfg.target_modules) == sorted(s.name for s in wl.kept_sites())
    n_lora = sum(1 for n, _ in loaded.named_parameters() if "lora_A" in n)
    assert n_lora == wl.n - 3  # exactly the kept adapters, none on removed modules


def test_export_replaces_atomically(tiny_model, tmp_path):
    wl = WeightLoRA.attach(tiny_model, CFG)
    target = tmp_path / "adapter"
    save_peft_adapter(wl.export_state(), wl, target, "tiny")
    first = (target / "adapter_model.safetensors").read_bytes()

    class Boom(dict):
        def items(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(Boom(), wl, target, "tiny")
    assert (target / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left


def test_a_dotted_target_names_one_linear_as_in_peft(tiny_model):
    """peft's rule: an entry matches a module named exactly so or ending with "." + it."""
    targets = ["layers.1.mlp.down_proj", "layers.0.self_attn.q_proj", "v_proj"]
    wl = WeightLoRA.attach(tiny_model, AdapterConfig(lora_rank=2, target_modules=targets))
    assert [s.name for s in wl.sites] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    # "ayers.1.mlp.down_proj" is not a path suffix of any name (peft matches whole components).
    with pytest.raises(ConfigError, match="matches no linear"):
        WeightLoRA.attach(tiny_model, AdapterConfig(target_modules=["ayers.1.mlp.down_proj"]))
