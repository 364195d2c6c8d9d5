"""The trainer in one process: the selection variants, options, and invariants."""

import pytest
import torch
from safetensors.torch import load_file

from wlora_dist.config import ConfigError, config_from_dict
from wlora_dist.distributed.env import init_distributed
from wlora_dist.training.results import TrainingError
from wlora_dist.training.trainer import Trainer

from .conftest import tiny_config_dict
from .helpers import train_in_process as _train

pytestmark = pytest.mark.inprocess


def test_simplex_selection_keeps_the_support(tiny_dir, tmp_path):
    trainer, result = _train(tiny_dir, tmp_path, selection={"method": "simplex", "steps": 4, "lr_w": 50.0})
    w = trainer.wl.gates
    assert torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-5
    nonzero = [s.name for s in trainer.wl.sites if float(w[s.index]) > 0]
    assert result.kept == nonzero and 0 < len(nonzero) <= 14
    assert len(trainer.wl.trainable_parameters()) == 2 * len(nonzero)


def test_method_none_is_plain_lora_on_all_adapters(tiny_dir, tmp_path):
    trainer, result = _train(tiny_dir, tmp_path, selection={"method": "none"})
    assert len(result.kept) == 14 and torch.all(trainer.wl.gates == 1)
    assert trainer.layout.record.events == [] and not (tmp_path / "run/report/selection-prune.json").exists()


def test_reinit_kept_restarts_the_kept_adapters(tiny_dir, tmp_path):
    # max_steps == T: the export happens right after the prune event, so B is fresh zeros.
    _, result = _train(tiny_dir, tmp_path, selection={"steps": 4, "reinit_kept": True}, train={"max_steps": 4})
    state = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert len(state) == 2 * 4
    assert all(torch.all(t == 0) for k, t in state.items() if "lora_B" in k)
    assert all(t.abs().sum() > 0 for k, t in state.items() if "lora_A" in k)


def test_fold_gates_sets_kept_gates_to_one(tiny_dir, tmp_path):
    trainer, _ = _train(tiny_dir, tmp_path, selection={"fold_gates": True})
    kept = [s.index for s in trainer.wl.kept_sites()]
    assert torch.all(trainer.wl.gates[kept] == 1) and len(kept) == 4


def test_gradient_accumulation_matches_one_big_batch(tiny_dir, tmp_path):
    _, big = _train(tiny_dir, tmp_path / "a", train={"micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 5})
    _, acc = _train(tiny_dir, tmp_path / "b", train={"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 5})
    for a, b in zip(big.history, acc.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    assert big.kept == acc.kept


def test_activation_checkpointing_gives_the_same_training(tiny_dir, tmp_path):
    _, plain = _train(tiny_dir, tmp_path / "a", train={"max_steps": 5})
    _, ckpt = _train(tiny_dir, tmp_path / "b", train={"max_steps": 5}, model={"gradient_checkpointing": True})
    for a, b in zip(plain.history, ckpt.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a.get("gate_grad_norm", 0) - b.get("gate_grad_norm", 0)) < 1e-5
    assert plain.kept == ckpt.kept


def test_nan_loss_stops_with_a_clear_error(tiny_dir, tmp_path):
    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run"))
    trainer = Trainer(cfg, init_distributed())
    trainer.setup()
    with torch.no_grad():
        trainer.wl.base_model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 1 on rank 0; lower optim.lr"):
        trainer.train()
    trainer.cleanup()
    assert not (tmp_path / "run/adapter").exists()


def test_a_nan_loss_in_a_step_with_no_trained_token_says_so(tiny_dir, tmp_path):
    """A batch whose every label is masked (what the tokeniser no longer lets through)
    divides zero by zero: the message names that, not the learning rate."""
    from wlora_dist.data.rows import IGNORE

    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run"))
    trainer = Trainer(cfg, init_distributed())
    trainer.setup()
    batches = trainer.train_iter

    def masked():
        for batch in batches:
            yield {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}

    trainer.train_iter = masked()
    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 1 on rank 0: .*no token to train on"):
        trainer.train()
    trainer.cleanup()


def test_a_gradient_that_overflows_under_a_finite_loss_stops_before_anything_is_saved(tiny_dir, tmp_path):
    # Seen on a random 24-layer model: the loss finite, one backward overflowing; the step
    # wrote NaN adapters and the run went on to fail a step later (or export them).
    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run", checkpoint={"every": 1}))
    trainer = Trainer(cfg, init_distributed())
    trainer.setup()
    param = trainer.wl.trainable_parameters()[0]
    param.register_hook(lambda g: torch.full_like(g, float("inf")))
    message = r"gradient norm is (inf|nan) at optimizer step 1 \(the loss, [0-9.]+, was finite\)"
    with pytest.raises(TrainingError, match=message):
        trainer.train()
    trainer.cleanup()
    assert not (tmp_path / "run/adapter").exists()
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_k_larger_than_n_is_a_config_error(tiny_dir, tmp_path):
    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run", selection={"k": 15}))
    with pytest.raises(ConfigError, match=r"selection.k: 15 exceeds the 14 adapters"):
        Trainer(cfg, init_distributed()).setup()


def test_epochs_with_packed_instruction_rows_through_the_chat_template(tiny_dir, tmp_path):
    """train.epochs sizes the run from the packed rows; the selection phase and warmup
    follow their fractions; the rows reach the model packed (position ids, no mask)."""
    import json

    from wlora_dist.model.tiny import make_rows

    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in make_rows(48, seed=5)))
    raw = tiny_config_dict(tiny_dir, tmp_path / "run")
    raw["train"] = {"epochs": 2, "micro_batch_size": 2, "eval_batches": 1}
    raw["selection"].pop("steps")
    raw["selection"]["steps_fraction"] = 0.25
    raw["optim"] = {"lr": 5e-3, "warmup_ratio": 0.2}
    raw["data"] = {"train": [str(f)], "eval_fraction": 0, "format": "instruction", "packing": True, "seq_len": 256}
    raw["data"]["cache_dir"] = str(tmp_path / "cache")  # this run's copy alone
    trainer = Trainer(config_from_dict(raw), init_distributed())
    seen = []
    trainer.setup()
    forward = trainer.backend.module.forward
    trainer.backend.module.forward = lambda **kw: seen.append(sorted(kw)) or forward(**kw)
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    cache = next((tmp_path / "cache").iterdir())
    import datasets

    packed = datasets.load_from_disk(str(cache / "train"))
    per_epoch = len(packed) // 2
    assert len(packed) <= 48 / 2  # two or more pairs per 256-token row
    assert trainer.cfg.train.max_steps == 2 * per_epoch == len(result.history)
    assert trainer.cfg.selection.steps == round(0.25 * 2 * per_epoch)
    assert trainer.cfg.optim.warmup_steps == round(0.2 * 2 * per_epoch)
    assert seen[0] == ["input_ids", "labels", "position_ids"]


def test_two_runs_of_the_same_data_in_different_folders_tokenise_once(tiny_dir, tmp_path, monkeypatch, caplog):
    """The tokenised copy lives in the shared cache (not in output.dir): a second run of the
    same data and tokenizer reads the first one's copy; the cache is $WLORA_DATA_CACHE,
    else $XDG_CACHE_HOME/wlora_dist/data."""
    import logging

    from wlora_dist.paths import default_data_cache

    monkeypatch.setenv("WLORA_DATA_CACHE", str(tmp_path / "shared"))
    caplog.set_level(logging.INFO, logger="wlora_dist")
    for name in ("first", "second"):
        cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / name))
        trainer = Trainer(cfg, init_distributed())
        trainer.setup()
        trainer.cleanup()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenised data:")]
    assert len(said) == 2 and " saved in " in said[0] and said[1].startswith("tokenised data: reusing"), said
    assert str(tmp_path / "shared") in said[1] and len(list((tmp_path / "shared").iterdir())) == 1
    assert not (tmp_path / "first/data_cache").exists()
    monkeypatch.delenv("WLORA_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_cache() == tmp_path / "xdg/wlora_dist/data"


def test_the_prune_event_times_the_layout_change_apart_from_its_probe_forwards(tiny_dir, tmp_path):
    import json

    _, result = _train(tiny_dir, tmp_path)
    event = result.history[3]  # T = 4: the prune event follows step 4
    assert 0 < event["prune_layout_seconds"] < event["prune_seconds"]
    assert all("prune_layout_seconds" not in h for i, h in enumerate(result.history) if i != 3)
    report = json.loads((tmp_path / "run/report/selection-prune.json").read_text())
    assert report["prune_layout_seconds"] == event["prune_layout_seconds"]
