"""Errors that can be known before loading arrive before loading, from `wlora-dist train`
and, identically, from `wlora-dist config --check`: the model's config.json (the model
built on meta, adapters attached), its tokenizer, the data files and the output folder."""

import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from wlora_dist.cli import main
from wlora_dist.config import ConfigError, config_from_dict, load_config
from wlora_dist.distributed.env import init_distributed

# Imported before any test patches the loaders (no_loading): a module first imported while
# they are patched would keep the patched names.
from wlora_dist.training.trainer import Trainer

from .conftest import ROOT, tiny_config_dict


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a run gets as far as a process group or a weight load."""

    def refuse(*a, **k):
        raise AssertionError("got past the preflight checks: loading started")

    monkeypatch.setattr("wlora_dist.distributed.env.init_distributed", refuse)
    monkeypatch.setattr("wlora_dist.model.loading.load_base_model", refuse)


def _both(tiny_dir: Path, tmp_path: Path, capsys, overrides: dict | None = None, **sections) -> tuple[str, str]:
    """(train's error, config --check's error) for the same config; both exit non-zero."""
    cfg = tiny_config_dict(tiny_dir, tmp_path / "run", **sections)
    for section, values in (overrides or {}).items():
        cfg[section].update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    errs = []
    for argv in (["train", "--config", str(path)], ["config", "--check", str(path)]):
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc != 0 and "Traceback" not in err, (argv, err)
        errs.append(err)
    return errs[0], errs[1]


def _model_copy(tiny_dir: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_dir / "model", folder)
    return folder


def test_config_check_passes_a_good_config_and_names_what_it_checked(tiny_dir, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_dir, tmp_path / "run")))
    assert main(["config", "--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok (LlamaForCausalLM, n=14 adapters" in out
    # A hub model this machine cannot reach: --syntax-only checks the fields alone.
    recipe = str(ROOT / "configs/llama3_8b_instruct.yaml")
    assert main(["config", "--syntax-only", "--check", recipe]) == 0
    assert main(["config", "--check", recipe]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "does not exist" in err and "not in the HF cache" in err  # both at once
    # The flags before or after the file.
    assert main(["config", "--check", "--syntax-only", recipe]) == 0
    assert main(["config", recipe, "--check", "--syntax-only"]) == 0


def test_config_check_reports_every_problem_of_every_stage_in_one_pass(tiny_dir, tmp_path, capsys):
    """An unknown field, a bad value, two fields that exclude each other, K > n (needs the
    model) and a data file whose columns the format does not read: one pass, five lines."""
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    cfg = tiny_config_dict(tiny_dir, tmp_path / "run", selection={"k": 99})
    cfg["model"]["bogus"] = 1
    cfg["optim"] = {"lr": -1}
    cfg["train"]["epochs"] = 2
    cfg["data"].update({"train": [str(data)], "format": "instruction", "template": "plain"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["config", "--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "5 problem(s)" in err, err
    for needle in (
        "model.bogus: unknown field",
        "optim.lr: -1",
        "train.epochs",
        "selection.k: 99 exceeds the 14 adapters",
        "column 'response' (data.response_field) not in the data; its columns are ['prompt', 'completion']",
    ):
        assert needle in err, (needle, err)


def test_data_whose_rows_fail_the_template_is_refused_before_loading(no_loading, tiny_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": "not a list of turns"}) + "\n")
    train, check = _both(tiny_dir, tmp_path, capsys, overrides={"data": {"train": [str(data)], "format": "chat"}})
    for err in (train, check):
        assert str(data) in err or "row 0" in err, err


def test_k_above_n_before_loading(no_loading, tiny_dir, tmp_path, capsys):
    train, check = _both(tiny_dir, tmp_path, capsys, selection={"k": 99})
    for err in (train, check):
        assert "selection.k: 99 exceeds the 14 adapters" in err


def test_existing_adapter_before_loading(no_loading, tiny_dir, tmp_path, capsys):
    (tmp_path / "run/adapter").mkdir(parents=True)
    train, check = _both(tiny_dir, tmp_path, capsys)
    for err in (train, check):
        assert "already holds an adapter" in err and "output.overwrite=true" in err


def test_a_fresh_run_over_earlier_checkpoints_before_loading(no_loading, tiny_dir, tmp_path, capsys):
    """resume_from '' (the default) over a folder holding checkpoints: refused by the
    preflight (it took every run for a resume, '' being a string, not None)."""
    (tmp_path / "run/checkpoints/step-00000004").mkdir(parents=True)
    (tmp_path / "run/checkpoints/step-00000004/meta.json").write_text("{}")
    train, check = _both(tiny_dir, tmp_path, capsys)
    for err in (train, check):
        assert "holds checkpoints of an earlier run (step-00000004 the newest)" in err


@pytest.mark.inprocess
def test_signal_handlers_are_the_command_lines_not_a_trainers(tiny_dir, tmp_path):
    """A Trainer inside another program leaves its SIGINT / SIGTERM alone unless asked; asked,
    it restores them after the run."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    for handle in (False, True):
        cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / f"run-{handle}"))
        trainer = Trainer(cfg, init_distributed(), handle_signals=handle)
        trainer.setup()
        during = {s: signal.getsignal(s) for s in before}
        trainer.cleanup()
        assert (during != before) == handle
        assert {s: signal.getsignal(s) for s in before} == before


def test_missing_model_and_data_before_loading(no_loading, tiny_dir, tmp_path, capsys):
    train, check = _both(tiny_dir, tmp_path, capsys, overrides={"model": {"path": str(tmp_path / "nope")}})
    assert "no such folder" in train and "no such folder" in check
    train, check = _both(tiny_dir, tmp_path, capsys, overrides={"data": {"train": [str(tmp_path / "x.jsonl")]}})
    assert "x.jsonl does not exist" in train and "data.train" in check


def test_missing_chat_template_before_loading(no_loading, tiny_dir, tmp_path, capsys):
    model = _model_copy(tiny_dir, tmp_path, "no-template")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    train, check = _both(
        tiny_dir, tmp_path, capsys, overrides={"model": {"path": str(model)}, "data": {"format": "chat"}}
    )
    for err in (train, check):
        assert "data.format=chat needs a tokenizer with a chat template" in err and "no-template" in err


def test_a_non_llama_architecture_is_named(no_loading, tiny_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(folder)
    train, check = _both(tiny_dir, tmp_path, capsys, overrides={"model": {"path": str(folder)}})
    for err in (train, check):
        assert "GPT2LMHeadModel" in err and "model_type 'gpt2'" in err and "matches no linear layer" in err


def test_remote_code_model_types_name_the_config_field(no_loading, tiny_dir, tmp_path, capsys):
    custom = _model_copy(tiny_dir, tmp_path, "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="wlora_test_custom", auto_map={"AutoConfig": "configuration_x.XConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    train, _ = _both(tiny_dir, tmp_path, capsys, overrides={"model": {"path": str(custom)}})
    assert "model.trust_remote_code: true" in train and "wlora_test_custom" in train
    del config["auto_map"]
    (custom / "config.json").write_text(json.dumps(config))
    train, _ = _both(tiny_dir, tmp_path, capsys, overrides={"model": {"path": str(custom)}})
    assert "unknown to transformers" in train


def test_hub_id_without_network_or_cache_is_one_message(no_loading, tiny_dir, tmp_path, capsys, monkeypatch):
    """No five retries and no traceback: one TCP probe (or HF_HUB_OFFLINE) decides."""
    hub = {"model": {"path": "wlora-test-org/no-such-model"}}
    train, check = _both(tiny_dir, tmp_path, capsys, overrides=hub)  # conftest sets HF_HUB_OFFLINE=1
    for err in (train, check):
        assert "wlora-test-org/no-such-model" in err and "HF_HUB_OFFLINE" in err and "hf download" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(
        "wlora_dist.model.loading._hub_unreachable", lambda: "huggingface.co: Name or service not known"
    )
    train, _ = _both(tiny_dir, tmp_path, capsys, overrides=hub)
    assert "the Hub cannot be reached (huggingface.co: Name or service not known)" in train


def test_gate_lr_zero_is_refused_for_selection(tiny_dir, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_dir, tmp_path / "run")))
    for method in ("topk", "simplex"):
        with pytest.raises(ConfigError, match=r"selection.lr_w: 0 .* never moves the gates"):
            load_config(path, ["selection.lr_w=0", f"selection.method={method}"])
    assert load_config(path, ["selection.lr_w=0", "selection.method=none"]).selection.lr_w == 0


def test_command_line_backend_against_the_accelerate_config(tiny_dir, tmp_path):
    """The README's promise: an override naming another backend than the accelerate config
    launched is an error, not silently taken; the same backend (or auto) is fine."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_dir, tmp_path / "run")))
    launched = [("distributed.backend", "fsdp2")]
    with pytest.raises(ConfigError, match=r"distributed.backend=zero on the command line.*launched 'fsdp2'"):
        load_config(path, ["distributed.backend=zero"], launched)
    for same in ("fsdp2", "auto"):
        assert load_config(path, [f"distributed.backend={same}"], launched).distributed.backend in ("fsdp2", "auto")


def test_a_null_in_parquet_is_reported_at_the_files_row(tmp_path):
    """The train/eval split shuffles rows; the error names the file's own row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wlora_dist.config import DataConfig
    from wlora_dist.data.pipeline import build_loaders
    from wlora_dist.data.rows import DataError
    from wlora_dist.model.tiny import make_tokenizer

    responses = [f"answer {i}" for i in range(40)]
    responses[17] = None
    f = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": [f"q {i}" for i in range(40)], "response": responses}), f)
    cfg = DataConfig(train=[str(f)], format="instruction", eval_fraction=0.25, seq_len=64)
    with pytest.raises(DataError, match=r"pairs\.parquet row 17: .*must be text, got str/NoneType"):
        build_loaders(cfg, 2, 0, make_tokenizer(), 0, 1, tmp_path / "cache")


def test_config_check_takes_overrides_and_a_world_size(tiny_dir, tmp_path, capsys):
    """key=value items are overrides (as train takes them), --world-size checks the batches
    for that many ranks (eval sized down, or refused with fewer eval rows than ranks), and
    no progress bar lands in the output when it is not a terminal."""
    path = tmp_path / "cfg.yaml"
    cfg = tiny_config_dict(tiny_dir, tmp_path / "run")
    cfg["data"]["eval"] = []
    cfg["data"]["eval_fraction"] = 0.01  # ~5 of the tiny data's rows
    path.write_text(yaml.safe_dump(cfg))
    assert main(["config", "--check", str(path), "selection.k=99"]) == 2
    assert "selection.k: 99 exceeds the 14 adapters" in capsys.readouterr().err
    assert main(["config", "--check", str(path), "train.micro_batch_size=2", "--world-size", "4"]) == 0
    out, err = capsys.readouterr()
    assert "eval rows (eval micro-batch 1)" in out and "at 4 rank(s)" in out
    assert "it/s" not in out + err and "examples/s" not in out + err  # no bars in a log
    assert main(["config", "--check", str(path), "train.micro_batch_size=1", "--world-size", "16"]) == 2
    assert "fewer than the 16 ranks that each evaluate one" in capsys.readouterr().err


@pytest.mark.launched
def test_a_missing_model_folder_is_refused_before_torch_is_imported(tiny_dir, tmp_path):
    """Seconds, not a minute on a loaded machine: the path is checked before the imports."""
    import subprocess
    import sys

    path = tmp_path / "cfg.yaml"
    cfg = tiny_config_dict(tiny_dir, tmp_path / "run")
    cfg["model"]["path"] = str(tmp_path / "no-model")
    path.write_text(yaml.safe_dump(cfg))
    code = (
        "import sys; from wlora_dist.cli import main; rc = main(['train', '--config', sys.argv[1]]); "
        "print(rc, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.split() == ["1", "False"], proc.stdout + proc.stderr
    assert "model.path=" in proc.stderr and "no such folder" in proc.stderr


def test_plan_reads_the_data_and_says_when_they_make_its_rows_wrong(tiny_dir, tmp_path, capsys):
    """plan --config reads the data as train does: short unpacked rows make its seq_len an
    upper bound (it says by how much), and data that fill no micro-batch are what train
    would refuse."""
    rows = tmp_path / "short.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "ok"}) + "\n" for i in range(40)))
    cfg = tiny_config_dict(tiny_dir, tmp_path / "run")
    cfg["data"].update(train=[str(rows)], eval=[], format="instruction", template="plain", seq_len=256)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", "--config", str(path), "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "data: 38 rows of at most" in out and "against data.seq_len=256" in out and "upper bound" in out
    assert main(["plan", "--config", str(path), "--cpu", "train.micro_batch_size=64"]) == 0
    assert "train would refuse them" in capsys.readouterr().out
    assert main(["plan", "--config", str(path), "--cpu", "--no-data"]) == 0
    assert "data:" not in capsys.readouterr().out


@pytest.mark.launched
def test_a_refusal_every_rank_finds_is_the_first_line_whichever_rank_exits_first(tiny_dir, tmp_path):
    """Two ranks under torchrun refuse the same config: rank 0 says it, as the first line,
    and the launcher's summary names it as the root cause (rank 1 waits for rank 0)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_dir, tmp_path / "run", selection={"k": 99})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "train.py"), "--config"]
    proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.strip() and " INFO " not in x]  # rank 0's progress lines
    assert proc.returncode != 0
    assert lines[0].startswith("error: ") and "selection.k: 99 exceeds the 14 adapters" in proc.stderr, lines[:3]
    assert sum(x.startswith("error") for x in lines) == 1  # said once
    root = proc.stderr.split("Root Cause")[-1]
    assert "rank      : 0" in root and "selection.k: 99" in root
