"""The memory planner: pure counts, the CLI, and planned vs measured peaks on CPU.

Measured = bytes resident before a training step (parameters, AdamW state, gates) plus
the most the step allocated on top (torch profiler allocation events), the trainer's
own step on a random-init Llama; FSDP2 world sizes 2-8 through the fake process group.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch

from wlora_dist.cli import main
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.planning.memory_plan import (
    GiB,
    PlanInput,
    adapter_numel,
    breakdown,
    plan,
    sites,
)
from wlora_dist.planning.search import recommend, replan_after_prune
from wlora_dist.planning.shapes import LINEARS, ModelShape
from wlora_dist.planning.sources import PRESETS

from .helpers import run_command


def test_static_counts_are_exact():
    shape = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=100)
    inp = PlanInput(shape, 1, BackendSpec("replicated"), base="fp32", compute="fp32", lora_rank=4, k=3)
    p = plan(inp)
    per_layer = 64 * 64 + 64 * 32 * 2 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v, o, mlp, norms
    assert p.before.base == 4 * (2 * per_layer + 2 * 100 * 64 + 64)
    adapters = 4 * sum(4 * (i + o) for i, o in shape.linear_dims().values()) * 2
    assert p.before.adapters == adapters + 4 * 14  # + the gate vector
    assert p.before.optimizer == 2 * adapters
    assert p.after.n_adapters == 3 and p.after.optimizer < p.before.optimizer
    assert plan(replace(inp, k=0.25)).after.n_adapters == 4  # a share of the 14 sites: round(3.5)


def test_sharding_divides_by_world_size():
    one = plan(PlanInput(PRESETS["llama3-8b"], 1, BackendSpec("fsdp2")))
    eight = plan(PlanInput(PRESETS["llama3-8b"], 8, BackendSpec("fsdp2")))
    assert abs(eight.before.base * 8 - one.before.base) <= 8
    assert abs(eight.before.optimizer * 8 - one.before.optimizer) <= 8 * 8
    assert eight.before.buffers > 0 == one.before.buffers  # gathered units only when sharded
    zero2 = plan(PlanInput(PRESETS["llama3-8b"], 8, BackendSpec("zero", 2)))
    assert zero2.before.base == one.before.base  # ZeRO-2 keeps the base whole


@pytest.mark.parametrize(
    "shape,targets,layers,mb,base,measured",
    [  # docs/measurements.md: plain peft LoRA r=16 on one H100, bf16 autocast, sequence 2048, peak GiB
        ("llama3.2-1b", LINEARS, None, 4, "bf16", 29.0),
        ("llama3.2-1b", ("q_proj", "v_proj"), tuple(range(8)), 4, "bf16", 24.4),
        ("llama3-8b", LINEARS, None, 2, "bf16", 48.0),
        ("llama3-8b", ("q_proj", "v_proj"), tuple(range(16)), 2, "bf16", 39.0),
        ("llama3-8b", ("down_proj",), None, 2, "bf16", 41.1),
        ("llama3-8b", ("q_proj",), (0,), 2, "bf16", 37.9),
    ],
)
def test_gpu_anchors_without_checkpointing(shape, targets, layers, mb, base, measured):
    """The counts agree with the peaks measured on a GPU (no gates: plain peft)."""
    inp = PlanInput(
        PRESETS[shape], 1, BackendSpec("replicated"), base=base, targets=targets, lora_layers=layers, micro_batch=mb
    )
    b = breakdown(inp, sites(inp), gates_train=False)
    assert abs(b.total / GiB / measured - 1) < 0.05


def test_kept_set_frees_activations_and_replan_switches_checkpointing_off():
    inp = PlanInput(
        PRESETS["llama3-8b"], 1, BackendSpec("replicated"), micro_batch=2, activation_checkpointing=True, gpu_gib=48
    )
    p = plan(inp)
    assert p.fits_before and p.fits_after
    no_ckpt = plan(replace(inp, activation_checkpointing=False))
    assert not no_ckpt.fits_before  # all 224 adapters need checkpointing on 48 GiB ...
    assert no_ckpt.fits_after  # ... 32 kept do not
    assert no_ckpt.after.activations < no_ckpt.before.activations * 0.8
    switched = replan_after_prune(inp)
    assert switched is not None and not switched.activation_checkpointing
    assert replan_after_prune(replace(inp, gpu_gib=30)) is None


def test_recommend_70b_on_24gb_cards():
    inp = PlanInput(PRESETS["llama3-70b"], 8, BackendSpec("fsdp2"), gpu_gib=24, micro_batch=1)
    assert not plan(inp).fits_before
    recs = recommend(inp)
    assert recs, "some setting must fit 70B on 8 x 24 GiB"
    for _, p in recs:
        assert p.before.total <= p.budget and p.after.total <= p.budget
    assert not recs[0][1].inp.backend.offload  # offload only when nothing else fits


def test_cli_plan_text_json_and_errors(capsys, tmp_path):
    assert main(["plan", "--model", "llama3-70b", "--world-size", "8", "--gpu-gib", "24", "--base", "int8"]) == 0
    out = capsys.readouterr().out
    assert "after prune" in out and "settings that fit" in out
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 100,
            }
        )
    )
    assert main(["plan", "--model", str(tmp_path), "--gpu-gib", "4", "--k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] == {"selection": True, "after_prune": True} and data["after"]["n_adapters"] == 3
    assert main(["plan", "--model", "llama3-8b", "--gpu-gib", "1"]) == 1
    assert "--reserve-gib" in capsys.readouterr().err
    assert main(["plan", "--model", "no-such-model"]) == 1
    assert "not a preset" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3-8b", "--targets", "q_proj,qproj"]) == 1
    assert "qproj" in capsys.readouterr().err


CASES = [
    {},  # replicated, all 28 adapters
    {"checkpointing": True},
    {"micro_batch": 1, "seq_len": 512, "targets": ["down_proj", "o_proj"]},
    {"int8": True, "checkpointing": True},
    {"world_size": 2, "backend": "fsdp2"},
    {"world_size": 4, "backend": "fsdp2", "checkpointing": True},
    {"world_size": 8, "backend": "fsdp2", "targets": ["q_proj", "v_proj"]},
    {"world_size": 2, "backend": "fsdp2", "int8": True},
    {"world_size": 2, "backend": "fsdp2", "loss_shards": 4, "checkpointing": True},
    {"loss_shards": 8},
    {"layers": [2, 3]},  # nothing saved upstream of the first adapter ...
    {"layers": [2, 3], "checkpointing": True},  # ... except under checkpointing (input grads on)
    {"checkpointing": True, "checkpoint_every": 3},  # layers 0 and 3 checkpointed, 1 and 2 not
]


@pytest.mark.launched
@pytest.mark.slow
def test_planned_within_10_percent_of_measured():
    """One process runs every case (fake process group for world sizes > 1)."""
    out = run_command([sys.executable, "-m", "benchmarks.plan_check", json.dumps(CASES)], timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    for r in results:
        # The static part is counted exactly: parameters (shards), AdamW state, gates.
        assert abs(r["resident_before"] - r["planned_static_before"]) < 4096, r
        for when in ("before", "after"):
            ratio = r[f"planned_{when}"] / r[f"measured_{when}"]
            assert 0.9 <= ratio <= 1.1, (r["case"], when, ratio)
    # The prune event lowers the measured peak (fewer saved activations, gates frozen).
    assert all(r["measured_after"] < r["measured_before"] for r in results)


def _checkpointing_on(trainer) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in trainer.wl.base_model.modules())


@pytest.mark.inprocess
def test_replan_at_prune_switches_checkpointing_off_same_math(tiny_dir, tmp_path):
    from .helpers import train_in_process as _train

    ckpt = {"path": str(tiny_dir / "model"), "gradient_checkpointing": True}
    ref, ref_result = _train(tiny_dir, tmp_path / "a", model=ckpt)
    assert _checkpointing_on(ref) and ref.layout.record.replanned is None
    fits = {"replan_at_prune": True, "budget_gib": 2.0, "reserve_gib": 0.0}
    run, result = _train(tiny_dir, tmp_path / "b", model=ckpt, memory=fits)
    assert not _checkpointing_on(run) and run.layout.record.replanned.activation_checkpointing is False
    # Nor is the embedding output made to require grad any more (transformers and peft each
    # registered a hook; one outlived the switch): what precedes the first adapter keeps nothing.
    embeddings = run.wl.base_model.get_input_embeddings()
    assert not [h for h in embeddings._forward_hooks.values() if h.__name__ == "make_inputs_require_grads"]
    assert not embeddings(torch.tensor([[3, 4]])).requires_grad
    assert result.kept == ref_result.kept
    losses = [h["loss"] for h in result.history]
    ref_losses = [h["loss"] for h in ref_result.history]
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 1e-6
    # A budget the kept set fits only with layer 0 still checkpointed (planned ~1.8 MiB
    # without checkpointing, ~1.4 with every 2nd layer, ~1.0 with all): partial checkpointing.
    partial = {"replan_at_prune": True, "budget_gib": 1.6 / 1024, "reserve_gib": 0.0}
    part, part_result = _train(tiny_dir, tmp_path / "c", model=ckpt, memory=partial)
    assert part.layout.record.replanned.checkpoint_every_n_layers == 2, part.layout.record.replanned
    layers = part.wl.base_model.model.layers
    assert [bool(m.gradient_checkpointing) for m in layers] == [True, False]
    part_losses = [h["loss"] for h in part_result.history]
    assert max(abs(a - b) for a, b in zip(part_losses, ref_losses, strict=True)) < 1e-6
    # A budget nothing fewer fits: checkpointing stays as it was.
    tight = {"replan_at_prune": True, "budget_gib": 1.2 / 1024, "reserve_gib": 0.0}
    kept_on, _ = _train(tiny_dir, tmp_path / "d", model=ckpt, memory=tight)
    assert kept_on.layout.record.replanned is None, kept_on.layout.record.replanned
    assert all(m.gradient_checkpointing for m in kept_on.wl.base_model.model.layers)


def test_zero_limits_are_sized_by_the_model_not_deepspeeds_defaults():
    """DeepSpeed's defaults (5e8-element gradient buckets: 1 GiB in bf16; ZeRO-3 keeping up
    to 1e9 gathered parameters) are replaced by sizes of this model: buckets of the
    trainable count, one decoder layer prefetched and reused, two live."""
    from wlora_dist.distributed.zero_config import memory_limits

    assert memory_limits(3, layer_numel=1000, trainable_numel=301) == {
        "reduce_bucket_size": 302,  # even (stage 1/2 alignment)
        "stage3_prefetch_bucket_size": 1000,
        "stage3_max_live_parameters": 2000,
        "stage3_max_reuse_distance": 1000,
    }
    assert memory_limits(2, 1000, 10**10) == {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    # The planner counts the same bucket: at 8B, 224 adapters of rank 16 in bf16.
    inp = PlanInput(PRESETS["llama3-8b"], 8, BackendSpec("zero", 3))
    p = plan(inp)
    numel = adapter_numel(inp, sites(inp))
    assert p.before.detail["zero_grad_bucket"] == 2 * numel < GiB // 8
    assert p.after.detail["zero_grad_bucket"] < p.before.detail["zero_grad_bucket"]  # the kept adapters' only
    assert plan(PlanInput(PRESETS["llama3-8b"], 8, BackendSpec("fsdp2"))).before.detail["zero_grad_bucket"] == 0


def test_plan_takes_the_launch_it_is_given(tiny_dir, tmp_path, capsys):
    """`plan --config C --accelerate-config A` plans what `accelerate launch --config_file A
    train.py --config C` runs: A's process count; a float32 base where the run is on CPU."""
    import yaml

    from .conftest import ROOT, tiny_config_dict

    cfg = tiny_config_dict(tiny_dir, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    acc = str(ROOT / "launch/accelerate/cpu_fsdp2.yaml")
    assert main(["plan", "--config", str(path), "--accelerate-config", acc]) == 0
    out = capsys.readouterr().out
    assert "world size 2: num_processes of" in out and "fsdp2, bf16 base" in out and "world size 2;" in out
    assert "model.dtype auto: the base in bf16 on a GPU (float32 on CPU: --cpu plans that)" in out
    assert main(["plan", "--config", str(path), "--accelerate-config", acc, "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "fsdp2, fp32 base" in out and "world size 2;" in out
    assert main(["plan", "--config", str(path), "--accelerate-config", acc, "--world-size", "4"]) == 0
    assert "world size 4;" in capsys.readouterr().out  # the flag wins


def test_offload_recommendations_state_the_host_ram_per_node(capsys):
    from wlora_dist.planning.memory_plan import adapter_numel, base_param_bytes, host_bytes_per_rank, sites

    inp = PlanInput(PRESETS["llama3-70b"], world_size=8, backend=BackendSpec("fsdp2", offload=True))
    base = sum(base_param_bytes(inp)[:2])
    adapters = adapter_numel(inp, sites(inp))  # fp32 masters, gradients and two AdamW moments: 16 bytes each
    assert host_bytes_per_rank(inp) == pytest.approx(base / 8 + 16 * adapters / 8, rel=1e-6)
    assert host_bytes_per_rank(replace(inp, backend=BackendSpec("fsdp2"))) == 0
    assert main(["plan", "--model", "llama3-70b", "--world-size", "8", "--gpu-gib", "24"]) == 0
    offload = [ln for ln in capsys.readouterr().out.splitlines() if "CPU offload" in ln]
    assert offload and all("GiB per node (8 ranks)" in ln for ln in offload), offload


def test_help_and_readme_list_every_preset(capsys):
    from .conftest import ROOT

    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    readme = (ROOT / "README.md").read_text()
    for name in PRESETS:
        assert name in text and f"`{name}`" in readme, name


def test_dotted_targets_count_the_one_linear_each_names():
    from wlora_dist.planning.memory_plan import sites

    shape = PRESETS["llama3-8b"]
    inp = PlanInput(shape, targets=("layers.3.mlp.down_proj", "model.layers.31.self_attn.q_proj", "v_proj"))
    assert sorted(sites(inp)) == sorted([(3, "down_proj"), (31, "q_proj"), *((i, "v_proj") for i in range(32))])
