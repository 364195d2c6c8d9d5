"""The 8-bit base (int8.py): bnb's numbers, in parameters FSDP2 and ZeRO-3 can shard."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wlora_dist.config import AdapterConfig, ModelConfig
from wlora_dist.errors import UserError
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.int8 import Int8Linear, dequantize, quantize_rows, scb_bits
from wlora_dist.model.sharded_loading import build_on_meta, materialize_sharded

from .conftest import tiny_config_dict
from .helpers import assert_same_loss_and_gradients, dequantised_twin, dist_config, int8_modules, run_worker

CPU = torch.device("cpu")


def _int8_wl(model_dir: Path, seed: int = 0) -> WeightLoRA:
    """The 8-bit base as the replicated backend builds it: on meta, then filled row by row."""
    cfg = ModelConfig(path=str(model_dir), quantization="int8")
    wl = WeightLoRA.attach(build_on_meta(cfg, CPU), AdapterConfig(lora_rank=4, lora_alpha=8))
    materialize_sharded(wl, str(model_dir), CPU, seed)
    return wl


def _bnb_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (2, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_quantised_on_load_bitwise_as_transformers_bnb_load_in_8bit(tiny_dir):
    ours = int8_modules(_int8_wl(tiny_dir / "model").peft_model)
    bnb_model = _bnb_model(tiny_dir / "model")
    assert len(ours) == 14 and "lm_head" not in ours  # decoder linears; lm_head stays float
    for name, m in ours.items():
        ref = bnb_model.get_submodule(name)
        assert m.weight.dtype == torch.int8 and m.SCB.dtype == torch.int32
        assert torch.equal(m.weight, ref.weight.data), name
        assert torch.equal(m.SCB.view(torch.float32), ref.weight.SCB), name


def test_same_logits_as_bnb_linear8bitlt_in_train_and_eval(tiny_dir):
    """Int8Linear makes bnb's own call (bnb.matmul over CB / SCB): the model's logits are
    bitwise those of transformers' bnb model, in training (dequantise + matmul on CPU) and
    in eval (int8 matmul of quantised activations)."""
    wl = _int8_wl(tiny_dir / "model")
    model = wl.peft_model
    bnb_model = _bnb_model(tiny_dir / "model")
    batch = _batch()
    for train in (True, False):
        model.train(train)
        bnb_model.train(train)
        with torch.no_grad(), model.disable_adapter():
            ours = model(input_ids=batch["input_ids"]).logits
            theirs = bnb_model(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_loss_and_adapter_gradients_match_a_dequantised_reference(tiny_dir):
    """Same adapters (B made non-zero) on the int8 base and on a float base holding the
    dequantised int8 weights: same loss, same gradients of every A, B and gate."""
    wl8 = _int8_wl(tiny_dir / "model")
    ints = int8_modules(wl8.peft_model)
    assert_same_loss_and_gradients(wl8, dequantised_twin(wl8, tiny_dir / "model"), _batch())
    assert all(not p.requires_grad and p.grad is None for m in ints.values() for p in (m.weight, m.SCB))


def test_reads_a_folder_saved_in_bnb_8bit(tiny_dir, tmp_path):
    saved = tmp_path / "int8"
    _bnb_model(tiny_dir / "model").save_pretrained(saved)
    files = load_file(str(saved / "model.safetensors"))
    assert files["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    ours = int8_modules(_int8_wl(saved).peft_model)
    for name, m in ours.items():
        assert torch.equal(m.weight, files[name + ".weight"])
        assert torch.equal(m.SCB, scb_bits(files[name + ".SCB"]))
    # Without model.quantization: int8 the folder is refused with the fix, not misread.
    with pytest.raises(UserError, match=r"model\.quantization: int8"):
        build_on_meta(ModelConfig(path=str(saved)), CPU)


def test_storage_survives_mixed_precision_casts():
    """bf16 casts (FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16, module.bfloat16()) touch
    float parameters only: the int8 weight and the int32-stored scales stay bitwise."""
    w = torch.randn(8, 16)
    cb, scb = quantize_rows(w)
    m = Int8Linear(16, 8)
    with torch.no_grad():
        m.weight.copy_(cb)
        m.SCB.copy_(scb_bits(scb))
    m.bfloat16()
    assert m.weight.dtype == torch.int8 and torch.equal(m.weight, cb)
    assert torch.equal(m.SCB.view(torch.float32), scb)
    assert (dequantize(cb, scb) - w).abs().max() <= scb.max() / 127  # half a step, at most one


@pytest.mark.dist
@pytest.mark.slow
def test_training_on_int8_equals_training_on_its_dequantised_weights(tiny_dir, tmp_path):
    """A whole run (selection, prune event, LoRA on K) on the 8-bit base and on a float
    checkpoint of its dequantised weights: same kept adapters, same training losses.
    (tests/test_distributed.py compares the 8-bit runs on 2 ranks with this one.)"""
    deq = tmp_path / "dequantised"
    shutil.copytree(tiny_dir / "model", deq)
    state = load_file(str(deq / "model.safetensors"))
    names = [k[: -len(".weight")] for k in state if ".layers." in k and k.endswith("_proj.weight")]
    assert len(names) == 14
    for name in names:
        state[name + ".weight"] = dequantize(*quantize_rows(state[name + ".weight"]))
    save_file(state, str(deq / "model.safetensors"), metadata={"format": "pt"})
    int8_run = run_worker(dist_config(tiny_dir, tmp_path / "int8", "replicated", 8, "int8"), 1, tmp_path)[0]
    float_cfg = dist_config(tiny_dir, tmp_path / "deq", "replicated", 8)
    float_cfg["model"]["path"] = str(deq)
    float_run = run_worker(float_cfg, 1, tmp_path)[0]
    assert int8_run["kept"] == float_run["kept"]
    for a, b in zip(int8_run["losses"], float_run["losses"], strict=True):
        assert abs(a - b) < 1e-5, (int8_run["losses"], float_run["losses"])
    assert int8_run["int8"]["dtypes"] == ["torch.int32", "torch.int8"]
    # The adapter is a standard peft adapter: it loads onto transformers' bnb 8-bit base.
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(_bnb_model(tiny_dir / "model"), str(tmp_path / "int8/adapter"))
    assert sum(".lora_" in n for n, _ in loaded.named_parameters()) == 2 * len(int8_run["kept"])


def test_config_knows_the_int8_fields(tiny_dir, tmp_path):
    from wlora_dist.config import ConfigError, config_from_dict

    cfg = tiny_config_dict(tiny_dir, tmp_path, model={"path": str(tiny_dir / "model"), "quantization": "int8"})
    assert config_from_dict(cfg).model.quantization == "int8"
    for field, value in (("quantization", "int4"), ("int8_threshold", -1.0)):
        bad = {**cfg, "model": {**cfg["model"], field: value}}
        with pytest.raises(ConfigError, match=rf"model\.{field}"):
            config_from_dict(bad)


@pytest.mark.dist
def test_fsdp2_bf16_mixed_precision_leaves_int8_and_scales_uncast(tmp_path):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16), as the fsdp2 backend uses it on GPU:
    the int8 weight and the int32-stored scales reach the forward uncast (a bf16 scale
    would cost 0.4% on every row); only the activations are bf16."""
    import os
    import sys

    from .conftest import ROOT
    from .helpers import free_port, run_command

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    worker = ROOT / "tests" / "int8_fsdp2_mp_worker.py"
    proc = run_command([sys.executable, str(worker)], timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["w"], out["scb"], out["stored"]) == ("torch.int8", "torch.int32", "torch.int8")
    assert out["x"] == "torch.bfloat16"
    assert out["y"] == "torch.bfloat16" and out["err"] <= 0.02 * out["scale"], out
