"""The 4-bit base (nf4.py): bitsandbytes' NF4 / FP4 numbers, in parameters FSDP2 and ZeRO-3
can shard (the 2- and 3-rank runs are cases of tests/test_distributed.py)."""

from pathlib import Path

import pytest
import torch

from wlora_dist.config import AdapterConfig, ConfigError, ModelConfig, config_from_dict
from wlora_dist.errors import UserError
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.nf4 import Linear4bit, quantize_rows_4bit
from wlora_dist.model.sharded_loading import build_on_meta, materialize_sharded

from .conftest import tiny_config_dict
from .helpers import assert_same_loss_and_gradients, dequantised_twin, int8_modules

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory) -> Path:
    """The tiny Llama at hidden size 64: transformers' 4-bit loader fixes the block size at
    64, which must divide every linear's input (the suite's tiny model has 32)."""
    from wlora_dist.model.tiny import write_default

    return write_default(tmp_path_factory.mktemp("tiny64"), rows=50, hidden=64, layers=2, seed=0)


def _4bit_wl(model_dir: Path, quant_type: str = "nf4", **model) -> WeightLoRA:
    cfg = ModelConfig(path=str(model_dir), quantization=quant_type, **model)
    wl = WeightLoRA.attach(build_on_meta(cfg, CPU), AdapterConfig(lora_rank=4, lora_alpha=8))
    materialize_sharded(wl, str(model_dir), CPU, 0)
    return wl


def _bnb_model(model_dir: Path, quant_type: str, double_quant: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, dtype=torch.float32)


@pytest.fixture(scope="module")
def saved_4bit(tiny64_dir, tmp_path_factory):
    """The tiny model saved by transformers + bitsandbytes in 4-bit (nf4; double
    quantisation off and on), made when first asked for."""
    folders: dict[bool, Path] = {}

    def get(double_quant: bool) -> Path:
        if double_quant not in folders:
            out = tmp_path_factory.mktemp(f"saved4-dq{int(double_quant)}")
            _bnb_model(tiny64_dir / "model", "nf4", double_quant).save_pretrained(str(out))
            folders[double_quant] = out
        return folders[double_quant]

    return get


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (2, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantised_on_load_bitwise_as_transformers_load_in_4bit_with_the_same_logits(tiny64_dir, quant_type):
    """Row by row on load, the packed codes and absmax are bitwise what transformers +
    bitsandbytes `load_in_4bit` make of the whole weight, and the logits are theirs."""
    wl = _4bit_wl(tiny64_dir / "model", quant_type)
    ours = int8_modules(wl.peft_model)
    theirs = _bnb_model(tiny64_dir / "model", quant_type)
    assert len(ours) == 14 and "lm_head" not in ours
    for name, m in ours.items():
        ref = theirs.get_submodule(name).weight
        assert isinstance(m, Linear4bit) and m.weight.dtype == torch.uint8 and m.absmax.dtype == torch.int32
        assert torch.equal(m.weight.reshape(-1), ref.data.reshape(-1)), name
        assert torch.equal(m.absmax.view(torch.float32).reshape(-1), ref.quant_state.absmax), name
    # In train mode: in eval bnb repacks the weight on CPU for an AVX512-BF16 kernel
    # (packing_format_for_cpu), another computation, not another model.
    theirs.train()
    with torch.no_grad(), wl.peft_model.disable_adapter():
        logits = wl.peft_model(input_ids=_batch()["input_ids"]).logits
    with torch.no_grad():
        want = theirs(input_ids=_batch()["input_ids"]).logits
    torch.testing.assert_close(logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["float folder", "saved 4-bit folder"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq-off", "dq-on"])
def test_read_or_quantised_bitwise_as_load_in_4bit_with_and_without_double_quant(
    tiny64_dir, saved_4bit, source, double_quant
):
    """Quantised on load from the float folder, or read as it is from a folder transformers
    saved in 4-bit: the codes, absmax and (double quantisation) the nested absmax and offset
    are bitwise transformers' `load_in_4bit`, and so are the logits."""
    path = tiny64_dir / "model" if source == "float folder" else saved_4bit(double_quant)
    wl = _4bit_wl(path, bnb_4bit_use_double_quant=double_quant)
    theirs = _bnb_model(tiny64_dir / "model", "nf4", double_quant)
    for name, m in int8_modules(wl.peft_model).items():
        ref, state = theirs.get_submodule(name).weight, theirs.get_submodule(name).weight.quant_state
        assert m.double_quant == double_quant and m.absmax.dtype == (torch.uint8 if double_quant else torch.int32)
        assert torch.equal(m.weight.reshape(-1), ref.data.reshape(-1)), name
        if double_quant:
            assert torch.equal(m.absmax.reshape(-1), state.absmax), name
            assert torch.equal(m.nested_absmax.view(torch.float32), state.state2.absmax), name
            assert torch.equal(m.nested_offset.view(torch.float32).reshape(()), state.offset), name
        else:
            assert torch.equal(m.absmax.view(torch.float32).reshape(-1), state.absmax), name
    theirs.train()  # see above
    ids = _batch()["input_ids"]
    with torch.no_grad(), wl.peft_model.disable_adapter():
        logits = wl.peft_model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, theirs(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True], ids=["dq-off", "dq-on"])
def test_zero3_partitions_and_fsdp2_rows_of_a_saved_4bit_folder_are_the_quantised_ones(
    tiny64_dir, saved_4bit, double_quant
):
    """What FSDP2 (rows) and ZeRO-3 (flat element ranges, ending mid-row) read from a
    4-bit folder equals what they quantise from the float folder, for every split."""
    from wlora_dist.model.checkpoint_reader import CheckpointReader

    cfg = ModelConfig(path=str(tiny64_dir / "model"), quantization="nf4", bnb_4bit_use_double_quant=double_quant)
    model = build_on_meta(cfg, CPU)
    model.to_empty(device=CPU)
    readers = [CheckpointReader(str(p), model) for p in (tiny64_dir / "model", saved_4bit(double_quant))]
    name = "model.layers.1.mlp.down_proj"  # 64 rows of 128 inputs: 64 codes bytes, 2 blocks per row
    for leaf in ("weight", "absmax"):
        for r in readers:
            r.prepare(f"{name}.{leaf}")
        shape = model.get_submodule(name).get_parameter(leaf).shape
        for start, stop in [(0, 64), (5, 17), (40, 64)]:
            a, b = (r.rows(f"{name}.{leaf}", start, stop) for r in readers)
            assert a.dtype == b.dtype and torch.equal(a, b), (leaf, start, stop)
        numel = shape.numel()
        for start, stop in [(0, numel // 3), (numel // 3, 2 * numel // 3 + 1), (2 * numel // 3 + 1, numel)]:
            a, b = (r.flat(f"{name}.{leaf}", start, stop, shape) for r in readers)
            assert torch.equal(a, b), (leaf, start, stop)
    # The folder's packed codes are read, not a float weight: 64 rows x 64 bytes.
    fresh = CheckpointReader(str(saved_4bit(double_quant)), model)
    fresh.rows(f"{name}.weight", 0, 64)
    assert fresh.bytes_read == 64 * 64


def test_a_saved_4bit_folder_with_other_settings_is_refused_naming_them(tiny64_dir, saved_4bit, tmp_path):
    from wlora_dist.model.saved_formats import check_checkpoint_quantization

    folder = str(saved_4bit(True))
    with pytest.raises(UserError, match=r"set model.quantization: nf4, model.bnb_4bit_use_double_quant: true to"):
        check_checkpoint_quantization(ModelConfig(path=folder))
    with pytest.raises(UserError, match=r"nf4, blocksize 64, double quantisation on.*set model.bnb_4bit_blocksize: 64"):
        check_checkpoint_quantization(
            ModelConfig(path=folder, quantization="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_blocksize=128)
        )
    with pytest.raises(UserError, match=r"set model.quantization: nf4 to"):
        check_checkpoint_quantization(ModelConfig(path=str(saved_4bit(False)), quantization="fp4"))
    # A module the folder stores in 4-bit but the run would keep in model.dtype.
    with pytest.raises(UserError, match=r"down_proj is stored in 4-bit there.*out of model.int8_skip_modules"):
        _4bit_wl(saved_4bit(True), bnb_4bit_use_double_quant=True, int8_skip_modules=["lm_head", "down_proj"])


def test_a_ranks_rows_quantise_as_inside_the_whole_weight():
    w = torch.randn(40, 192)
    packed, absmax = quantize_rows_4bit(w, "nf4", 64)
    part_p, part_a = quantize_rows_4bit(w[13:29], "nf4", 64)
    assert packed.shape == (40, 96) and absmax.shape == (40, 3)
    assert torch.equal(part_p, packed[13:29]) and torch.equal(part_a, absmax[13:29])


@pytest.mark.parametrize("double_quant", [False, True], ids=["dq-off", "dq-on"])
def test_loss_and_adapter_and_gate_gradients_match_a_dequantised_reference(tiny64_dir, double_quant):
    """Same adapters on the NF4 base and on a float base holding its dequantised weights:
    the same loss and gradients of every A, B and gate (float32, tolerance 1e-5)."""
    wl4 = _4bit_wl(tiny64_dir / "model", bnb_4bit_use_double_quant=double_quant)
    assert_same_loss_and_gradients(wl4, dequantised_twin(wl4, tiny64_dir / "model"), _batch())
    frozen = [p for m in int8_modules(wl4.peft_model).values() for p in (m.weight, m.absmax)]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_4bit_settings_are_checked(tiny_dir, tmp_path):
    def cfg(**model):
        raw = tiny_config_dict(tiny_dir, tmp_path / "run")
        raw["model"].update(quantization="nf4", **model)
        return config_from_dict(raw)

    assert cfg(bnb_4bit_use_double_quant=True).model.bnb_4bit_use_double_quant
    with pytest.raises(ConfigError, match=r"bnb_4bit_blocksize: 48 must be a power of two"):
        cfg(bnb_4bit_blocksize=48)
    with pytest.raises(UserError, match=r"has 32 input features, not a multiple of model.bnb_4bit_blocksize=64"):
        build_on_meta(cfg().model, CPU)


@pytest.mark.parametrize("double_quant", [False, True], ids=["dq-off", "dq-on"])
def test_the_planner_counts_the_4bit_base_as_stored(tiny64_dir, double_quant):
    """`wlora-dist plan --base nf4`: packed codes (half a byte per weight) and one float32
    absmax per block, or under double quantisation one byte per block plus the nested state
    (4 bytes per 256 blocks and the offset): the byte count the model really stores."""
    from wlora_dist.planning.memory_plan import PlanInput, base_param_bytes
    from wlora_dist.planning.sources import shape_from

    cfg = ModelConfig(path=str(tiny64_dir / "model"), quantization="nf4", bnb_4bit_use_double_quant=double_quant)
    model = build_on_meta(cfg, CPU)
    nested = [b for m in model.modules() if isinstance(m, Linear4bit) for b in m.buffers(recurse=False)]
    assert len(nested) == (28 if double_quant else 0)
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *nested])
    inp = PlanInput(shape_from(str(tiny64_dir / "model")), base="nf4", compute="fp32", double_quant_4bit=double_quant)
    layers, root, _ = base_param_bytes(inp)
    assert layers + root == stored


@pytest.mark.inprocess
def test_trained_on_nf4_its_adapter_loads_on_the_float_and_on_a_bnb_4bit_base(tiny64_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .helpers import train_in_process

    _, result = train_in_process(
        tiny64_dir,
        tmp_path,
        model={"path": str(tiny64_dir / "model"), "quantization": "nf4"},
        selection={"steps": 2, "k": 3},
        train={"max_steps": 4},
    )
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in result.history])))
    ids = _batch()["input_ids"]
    for base in (
        AutoModelForCausalLM.from_pretrained(str(tiny64_dir / "model")),
        _bnb_model(tiny64_dir / "model", "nf4"),
    ):
        model = PeftModel.from_pretrained(base, str(result.adapter_dir))
        assert sum("lora_A" in n for n, _ in model.named_parameters()) == 3
        model.train()  # bnb's CPU eval path repacks the weight (see above)
        with torch.no_grad():
            tuned = model(input_ids=ids).logits
            with model.disable_adapter():
                plain = model(input_ids=ids).logits
        assert (tuned - plain).abs().max() > 1e-4  # the trained adapters act on either base
