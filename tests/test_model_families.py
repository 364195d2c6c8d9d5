"""Decoder-only families beside Llama, as tiny random-init models built with transformers'
own config classes: Qwen2, Qwen3, Mistral, Gemma 1/2/3 (text) and Phi-3 (fused qkv_proj /
gate_up_proj). Each trains in one process and its exported adapter loads in plain peft,
trains on the 8-bit base, runs on 2 ranks under FSDP2 and ZeRO-3 against one process
(Gemma's non-persistent embedding scale recomputed after sharded loading), and the memory
planner reads its config.json."""

from pathlib import Path

import pytest
import torch

from .helpers import dist_config, run_worker_many, train_in_process

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


@pytest.mark.inprocess
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


@pytest.mark.inprocess
@pytest.mark.parametrize("family", ["gemma", "qwen2", "phi3"])
def test_family_on_the_8bit_base(family, family_dirs, tiny_dir, tmp_path):
    """The 8-bit base is built on meta and filled row by row: Gemma's embedding scale (a
    non-persistent buffer) recomputed, not read; Qwen2's q/k/v biases read as they are;
    Phi-3's fused linears quantised. (Every family on the 8-bit base, one process against
    2 ranks: test_every_family_sharded_on_two_ranks_matches_one_process.)"""
    int8, res8 = train_in_process(
        tiny_dir,
        tmp_path / "int8",
        model={"path": str(family_dirs[family]), "quantization": "int8"},
        selection={"steps": 2, "k": 3},
        train={"max_steps": 4},
    )
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in res8.history])))
    from wlora_dist.model.int8 import Int8Linear

    n_int8 = sum(isinstance(m, Int8Linear) for m in int8.wl.base_model.modules())
    assert n_int8 == 2 * FAMILIES[family][2]  # every decoder linear is 8-bit (lm_head skipped)
    emb = int8.wl.base_model.get_submodule("model.embed_tokens")
    if hasattr(emb, "embed_scale"):
        assert float(emb.embed_scale) == pytest.approx(32**0.5, rel=1e-2)


def _family_cfg(tiny_dir: Path, out: Path, family: str, family_dir: Path, backend: str, nproc: int) -> dict:
    """The distributed tests' run, shorter: global batch 8, K = 3, prune after step 3 of 5."""
    cfg = dist_config(tiny_dir, out / f"{family}-{backend}", backend, 8 // nproc)
    cfg["model"]["path"] = str(family_dir)
    cfg["selection"].update(steps=3, k=3, project_every=3)
    cfg["train"].update(max_steps=5, grad_accum_steps=1, eval_batches=1)
    return cfg


def _families_run(
    family_dirs, tiny_dir: Path, out: Path, backend: str, nproc: int, int8: bool = False
) -> dict[str, list[dict]]:
    """Every family (and with ``int8`` each on the 8-bit base too, keyed 'name+int8'), one
    after another in one launch of ``nproc`` ranks."""
    runs = {}
    for f in sorted(FAMILIES):
        runs[f] = _family_cfg(tiny_dir, out, f, family_dirs[f], backend, nproc)
        if int8:
            runs[f + "+int8"] = _family_cfg(tiny_dir, out / "int8", f, family_dirs[f], backend, nproc)
            runs[f + "+int8"]["model"]["quantization"] = "int8"
    return dict(zip(runs, run_worker_many(list(runs.values()), nproc), strict=True))


@pytest.fixture(scope="module")
def one_process(family_dirs, tiny_dir, tmp_path_factory):
    return _families_run(family_dirs, tiny_dir, tmp_path_factory.mktemp("one"), "replicated", 1, int8=True)


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_every_family_sharded_on_two_ranks_matches_one_process(backend, family_dirs, one_process, tiny_dir, tmp_path):
    """Each family under FSDP2 (float and 8-bit base) and ZeRO-3 (base partitioned) on 2
    ranks: the same kept set and losses as one process, the ranks bitwise equal, the base
    really split."""
    two_ranks = _families_run(family_dirs, tiny_dir, tmp_path, backend, 2, int8=backend == "fsdp2")
    assert len(two_ranks) == len(FAMILIES) * (2 if backend == "fsdp2" else 1)
    for family, two in two_ranks.items():
        one = one_process[family][0]
        assert [r["torch_dist_world_size"] for r in two] == [2, 2], family
        assert two[0]["kept"] == one["kept"] and len({r["params_digest"] for r in two}) == 1, family
        for a, b in zip(one["losses"], two[0]["losses"], strict=True):
            assert abs(a - b) < 2e-4, (family, one["losses"], two[0]["losses"])
        assert two[0]["base_local_bytes"] < two[0]["base_total_bytes"], family  # really sharded


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_planner_reads_each_familys_config_json(family, family_dirs):
    """wlora-dist plan on the family's folder: its linears, adapter sizes and base bytes
    agree with the model transformers builds from the same config.json."""
    from wlora_dist.config import AdapterConfig, ModelConfig
    from wlora_dist.method.weight_lora import WeightLoRA
    from wlora_dist.model.sharded_loading import build_on_meta
    from wlora_dist.planning.memory_plan import PlanInput, adapter_numel, base_param_bytes, sites
    from wlora_dist.planning.sources import shape_from

    shape = shape_from(str(family_dirs[family]))
    model = build_on_meta(ModelConfig(path=str(family_dirs[family]), dtype="float32"), torch.device("cpu"))
    wl = WeightLoRA.attach(model, AdapterConfig(lora_rank=4))
    inp = PlanInput(shape, lora_rank=4, base="fp32", compute="fp32")
    assert sorted((s.layer, s.kind) for s in wl.sites) == sorted(sites(inp))
    assert adapter_numel(inp, sites(inp)) == sum(p.numel() for p in wl.trainable_parameters() if p.dim() == 2)
    real = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)  # the frozen base
    layers, root, _ = base_param_bytes(inp)
    assert abs(layers + root - real) / real < 0.02  # biases, q/k norms and extra norms are left out
