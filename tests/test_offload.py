"""train.offload_activations (model/offload.py): what backward needs waits in host memory.
On CPU the saved tensors are copied into separate host tensors, so the path runs and its
values are checked; on a GPU the copies go to pinned memory on a side stream."""

from __future__ import annotations

import pytest
import torch

from wlora_dist.config import AdapterConfig
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.loading import enable_checkpointing
from wlora_dist.model.offload import OffloadActivations
from wlora_dist.model.tiny import make_model

from .helpers import train_in_process


def _step(checkpointing: bool, offload: bool) -> tuple[float, list[torch.Tensor], OffloadActivations | None]:
    torch.manual_seed(0)
    model = make_model(300, hidden=64, layers=2)
    model.config.use_cache = False
    model.train()
    wl = WeightLoRA.attach(model, AdapterConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.1))
    with torch.no_grad():
        for p in wl.trainable_parameters():
            p.normal_(0, 0.1)
    if checkpointing:
        enable_checkpointing(model)
    ids = torch.randint(3, 300, (2, 256), generator=torch.Generator().manual_seed(1))
    hooks = OffloadActivations(min_bytes=1024) if offload else None
    torch.manual_seed(2)  # dropout's masks
    with hooks if hooks is not None else torch.enable_grad():
        loss = wl.peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in wl.trainable_parameters() if p.grad is not None], hooks


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_offloaded_activations_give_the_same_step(checkpointing):
    """The same loss and gradients bitwise (dropout on), with and without checkpointing;
    with checkpointing what goes to the host is each decoder layer's input (torch's
    non-reentrant checkpoint saves them through the same hooks); never a parameter."""
    loss, grads, _ = _step(checkpointing, offload=False)
    loss_off, grads_off, hooks = _step(checkpointing, offload=True)
    assert loss == loss_off and all(torch.equal(a, b) for a, b in zip(grads, grads_off, strict=True))
    assert hooks is not None and hooks.moved_bytes > 0
    layer_inputs = sum(1 for shape in hooks.moved if shape == (2, 256, 64))
    assert layer_inputs >= 2  # both layers' inputs (and the final norm's)
    if checkpointing:
        _, _, plain = _step(False, offload=True)
        assert plain is not None and hooks.moved_bytes < plain.moved_bytes / 2  # inputs only


@pytest.mark.inprocess
def test_a_run_with_offloaded_activations_trains_the_same(tiny_dir, tmp_path):
    ckpt = {"path": str(tiny_dir / "model"), "gradient_checkpointing": True}
    _, ref = train_in_process(tiny_dir, tmp_path / "a", model=ckpt)
    _, off = train_in_process(tiny_dir, tmp_path / "b", model=ckpt, train={"offload_activations": True})
    assert [h["loss"] for h in off.history] == [h["loss"] for h in ref.history] and off.kept == ref.kept


def test_the_plan_keeps_one_layer_on_the_device_and_the_rest_on_the_host():
    from dataclasses import replace

    from wlora_dist.planning.memory_plan import PlanInput, activation_bytes, host_bytes_per_rank, plan, sites
    from wlora_dist.planning.sources import PRESETS

    inp = PlanInput(PRESETS["llama3-8b"], seq_len=32768, activation_checkpointing=True, loss_shards=8)
    out = replace(inp, offload_activations=True)
    kept, moved = activation_bytes(inp, sites(inp), True), activation_bytes(out, sites(out), True)
    assert moved["offloaded"] == kept["saved"] and host_bytes_per_rank(out) == kept["saved"]
    assert host_bytes_per_rank(inp) == 0
    assert moved["saved"] < kept["saved"] / 10  # one layer's input (and the final norm's) on the GPU, of 32
    assert plan(out).before.total < plan(inp).before.total
