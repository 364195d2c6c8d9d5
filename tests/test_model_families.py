"""Decoder-only families beside Llama, as tiny random-init models built with transformers'
own config classes: Qwen2, Qwen3, Mistral, Gemma 1/2/3 (text) and Phi-3 (fused qkv_proj /
gate_up_proj). Each trains in one process and its exported adapter loads in plain peft;
Gemma (non-persistent embedding scale, recomputed after sharded loading) and Phi-3 (fused
linears) also on 2 ranks under FSDP2 and ZeRO-3 against one process; Qwen3 and Gemma with
the 8-bit base."""

from pathlib import Path

import pytest
import torch

from .helpers import dist_config, run_worker, train_in_process

FAMILIES = {  # name: (model_type, extra config, adapter kinds per layer)
    "qwen2": ("qwen2", {}, 7),
    "qwen3": ("qwen3", {"head_dim": 8}, 7),
    "mistral": ("mistral", {}, 7),
    "gemma": ("gemma", {"head_dim": 8}, 7),
    "gemma2": ("gemma2", {"head_dim": 8}, 7),
    "gemma3_text": ("gemma3_text", {"head_dim": 8}, 7),
    "phi3": ("phi3", {}, 4),  # qkv_proj, o_proj, gate_up_proj, down_proj
}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from wlora_dist.model.tiny import make_tokenizer

    tok = make_tokenizer()
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (model_type, extra, _) in FAMILIES.items():
        cfg = AutoConfig.for_model(
            model_type,
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **extra,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_and_its_adapter_loads_in_plain_peft(family, family_dirs, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, result = train_in_process(
        tiny_dir,
        tmp_path,
        model={"path": str(family_dirs[family])},
        selection={"steps": 2, "k": 3},
        train={"max_steps": 4},
    )
    assert trainer.wl.n == 2 * FAMILIES[family][2] and len(result.kept) == 3
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(family_dirs[family])), str(result.adapter_dir)
    )
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 3


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_family_on_the_8bit_base(family, family_dirs, tiny_dir, tmp_path):
    """The 8-bit base is built on meta and filled row by row: Gemma's embedding scale (a
    non-persistent buffer) must be recomputed, not read; the run equals its float twin's
    selection."""
    int8, res8 = train_in_process(
        tiny_dir,
        tmp_path / "int8",
        model={"path": str(family_dirs[family]), "quantization": "int8"},
        selection={"steps": 2, "k": 3},
        train={"max_steps": 4},
    )
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in res8.history])))
    emb = int8.wl.base_model.get_submodule("model.embed_tokens")
    if hasattr(emb, "embed_scale"):
        assert float(emb.embed_scale) == pytest.approx(32**0.5, rel=1e-2)


def _family_run(tiny_dir: Path, out: Path, family_dir: Path, backend: str, nproc: int) -> list[dict]:
    cfg = dist_config(tiny_dir, out / backend, backend, 8 // nproc)
    cfg["model"]["path"] = str(family_dir)
    return run_worker(cfg, nproc, out)


@pytest.fixture(scope="module")
def one_process(family_dirs, tiny_dir, tmp_path_factory):
    runs: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in runs:
            out = tmp_path_factory.mktemp(f"one-{family}")
            runs[family] = _family_run(tiny_dir, out, family_dirs[family], "replicated", 1)[0]
        return runs[family]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("family", ["gemma", "phi3"])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_family_sharded_on_two_ranks_matches_one_process(family, backend, family_dirs, one_process, tiny_dir, tmp_path):
    one, two = one_process(family), _family_run(tiny_dir, tmp_path, family_dirs[family], backend, 2)
    assert [r["torch_dist_world_size"] for r in two] == [2, 2]
    assert two[0]["kept"] == one["kept"] and len({r["params_digest"] for r in two}) == 1
    for a, b in zip(one["losses"], two[0]["losses"], strict=True):
        assert abs(a - b) < 2e-4, (one["losses"], two[0]["losses"])
    assert two[0]["base_local_bytes"] < two[0]["base_total_bytes"]  # really sharded
