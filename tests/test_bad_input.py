"""Bad input, as a user meets it: `wlora-dist train` with a broken config, model, data or
checkpoint. Each case: one clear message naming the field / file / row and the fix, a
non-zero exit, no traceback, and nothing that existed overwritten (a good adapter and a
good checkpoint sit in output.dir, with output.overwrite on so only the error stops the
run from replacing them).

The same cases hold `config --check` and `train` together: every case goes through both,
and the check must refuse what train refuses, with train's own message; good
configurations pass both (train past its first step). A new refusal in train comes with a
case here; one that needs training to be found (a loss that turns NaN) is marked so, and
the check says what it did not check."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from wlora_dist.cli import main
from wlora_dist.model.tiny import write_default

from .conftest import tiny_config_dict

SENTINEL = "a good adapter from an earlier run"


@pytest.fixture(scope="module")
def good_checkpoint(tiny_dir, tmp_path_factory) -> Path:
    """A complete checkpoint of a 2-step, 1-process run (lora_rank 4)."""
    out = tmp_path_factory.mktemp("good")
    cfg = tiny_config_dict(tiny_dir, out / "run", train={"max_steps": 2}, selection={"steps": 1})
    cfg["checkpoint"] = {"every": 1}
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path)]) == 0
    return out / "run/checkpoints/step-00000001"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return write_default(tmp_path_factory.mktemp("other"), rows=50, hidden=32, layers=3, seed=1) / "model"


def _data(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def _pickled_model(tmp: Path) -> str:
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    return str(folder)


def _truncated_model(tmp: Path, model: str) -> str:
    folder = tmp / "truncated"
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    return str(folder)


def _under_a_file(tmp: Path) -> str:
    (tmp / "a-file").write_text("not a folder")
    return str(tmp / "a-file" / "run")


def _a_file(tmp: Path) -> str:
    (tmp / "a-file").write_text("not a folder")
    return str(tmp / "a-file")


def _jsonl(tmp: Path, name: str, rows: list) -> str:
    return _data(tmp, name, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


NO_EVAL = {"eval": [], "eval_fraction": 0.0}
ALPACA = {"eval": [], "format": "instruction", "prompt_field": "instruction", "response_field": "output"}
ALPACA_ROWS = [{"instruction": "a", "input": "", "output": "b"}] * 20
CUT = [{"prompt": "x " * 100, "response": "y"}] * 8 + [{"prompt": "a", "response": "b"}] * 8  # 8 replies cut off


def _set(cfg: dict, tmp: Path, file: str, rows: list[dict], data: dict, **train) -> None:
    """data.train = ``rows`` written to ``file`` (a JSON array for .json, else JSON lines),
    with data.* ``data`` and train.* ``train``."""
    content = json.dumps(rows) if file.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    cfg["data"].update(train=[_data(tmp, file, content.encode())], **data)
    cfg["train"].update(train)


def _pair(prompt: str, response: str) -> bytes:
    return (json.dumps({"prompt": prompt, "response": response}) + "\n").encode()


def _row(text: str) -> bytes:
    return (json.dumps({"text": text}) + "\n").encode()


CASES = {
    # name: (how to break the config dict, message fragments)
    "malformed_yaml": ("YAML", ["not valid YAML"]),
    "unknown_field": (lambda c, t: c["train"].update(max_step=5), ["train.max_step: unknown field"]),
    "mistyped_field": (lambda c, t: c["train"].update(max_steps="many"), ["train.max_steps", "int"]),
    "k_zero": (lambda c, t: c["selection"].update(k=0), ["selection.k: 0 must be >= 1"]),
    "k_above_n": (lambda c, t: c["selection"].update(k=99), ["selection.k: 99 exceeds the 14 adapters"]),
    "negative_lr": (lambda c, t: c["optim"].update(lr=-1.0), ["optim.lr: -1.0 must be >= 0"]),
    "negative_gate_lr": (lambda c, t: c["selection"].update(lr_w=-5.0), ["selection.lr_w: -5.0 must be >= 0"]),
    "targets_match_nothing": (
        lambda c, t: c["adapter"].update(target_modules=["qkv_proj"]),
        ["adapter.target_modules=['qkv_proj']", "matches no linear layer", "q_proj"],
    ),
    "missing_model": (lambda c, t: c["model"].update(path=str(t / "no-model")), ["model.path=", "no such folder"]),
    "pickled_weights_only": (
        lambda c, t: c["model"].update(path=_pickled_model(t)),
        ["no safetensors weights", "pytorch_model.bin", "never loaded"],
    ),
    "truncated_model_weights": (
        lambda c, t: c["model"].update(path=_truncated_model(t, c["model"]["path"])),
        ["model.path=", "truncated", "a weights file cannot be read"],
    ),
    "output_dir_is_not_a_folder": (
        lambda c, t: c["output"].update(dir=_under_a_file(t)),
        ["output.dir", "a-file is a file, not a folder"],
    ),
    "output_dir_is_an_existing_file": (
        lambda c, t: c["output"].update(dir=_a_file(t)),
        ["output.dir", "a-file is a file, not a folder"],
    ),
    "missing_data": (lambda c, t: c["data"].update(train=[str(t / "none.jsonl")]), ["none.jsonl"]),
    "empty_dataset": (lambda c, t: c["data"].update(train=[_data(t, "empty.jsonl", b"")]), ["empty.jsonl"]),
    "row_longer_than_seq_len": (
        lambda c, t: c["data"].update(
            train=[_data(t, "long.jsonl", _pair("a", "b") * 20 + _pair("x" * 500, "y"))],
            eval=[],  # the tiny eval rows exceed 64 tokens as instructions (the preflight's preview says so)
            format="instruction",
            truncate=False,
        ),
        ["row 20", "tokens > data.seq_len=64"],
    ),
    "wrong_column": (
        lambda c, t: c["data"].update(train=[_data(t, "cols.jsonl", _row("a") * 50)], format="instruction"),
        ["prompt", "text"],
    ),
    "invalid_utf8": (
        lambda c, t: c["data"].update(train=[_data(t, "bad.jsonl", _row("ok") * 3 + b'{"text": "\xff\xfe"}\n')]),
        ["bad.jsonl", "UTF-8", "line 4"],
    ),
    "resume_without_checkpoint": (
        lambda c, t: c["checkpoint"].update(resume_from="latest", dir=str(t / "no-ckpts")),
        ["checkpoint.resume_from=latest: no checkpoint in"],
    ),
    "resume_from_a_non_checkpoint": (
        lambda c, t: c["checkpoint"].update(resume_from=str(t)),
        ["not a checkpoint folder"],
    ),
    "nan_or_inf_loss": (
        lambda c, t: c["optim"].update(lr=1e30, warmup_steps=0, max_grad_norm=0.0),
        ["loss is", "lower optim.lr"],
    ),
    # Found only by reading every row: the check used to read the first four.
    "text_column_missing_mid_file": (
        lambda c, t: c["data"].update(train=[_jsonl(t, "mid.jsonl", [{"text": "a b c"}] * 12 + [{"body": "x"}])]),
        ["mid.jsonl row 12", "data.text_field 'text'"],
    ),
    "bad_json_mid_file": (
        lambda c, t: c["data"].update(train=[_data(t, "bad.jsonl", _row("a b") * 10 + b"{not json\n" + _row("c"))]),
        ["bad.jsonl", "could not be read as json", "row 10"],
    ),
    "fewer_rows_than_a_micro_batch": (
        lambda c, t: _set(c, t, "few.jsonl", [{"text": "a b"}] * 2, {"eval": [], "seq_len": 4}, micro_batch_size=64),
        ["data.train", "rows after tokenising cannot fill one micro-batch of 64", "train.micro_batch_size"],
    ),
    "seq_len_longer_than_all_the_tokens": (
        lambda c, t: _set(c, t, "short.jsonl", [{"text": "a b"}] * 5, {"seq_len": 4096}),
        ["no row after tokenising", "data.seq_len=4096"],
    ),
    "chats_without_an_assistant_turn": (
        lambda c, t: _set(c, t, "chat.jsonl", [_chat(("system", "be brief"), ("user", "hi"))] * 20, NO_EVAL),
        ["20 of 20 rows have no token to train on", "chat.jsonl row 0", "every row", "assistant's turn"],
    ),
    "replies_cut_away_by_truncation": (
        lambda c, t: _set(c, t, "cut.jsonl", CUT, {**NO_EVAL, "format": "instruction", "seq_len": 64}),
        ["8 of 16 rows have no token to train on", "data.max_untrained_share=0.1", "data.seq_len"],
    ),
    "alpaca_json_with_a_wrong_column": (
        lambda c, t: _set(c, t, "alpaca.json", [{"instruction": "a", "input": "", "answer": "b"}] * 20, ALPACA),
        ["column 'output' (data.response_field) not in the data", "answer"],
    ),
    "alpaca_json_prompt_field_not_in_it": (
        lambda c, t: _set(c, t, "alpaca2.json", ALPACA_ROWS, {**ALPACA, "prompt_field": "question"}),
        ["column 'question' (data.prompt_field) not in the data"],
    ),
}
# What training alone finds (the check says it cannot know them without training).
TRAIN_ONLY = {"nan_or_inf_loss": "a loss that turns NaN at some step"}


GOOD_DATA = {  # name: (file, rows, data.*): good data both `config --check` and `train` pass
    "alpaca_json_named_fields": (
        "alpaca.json",
        [{"instruction": "Add.", "input": f"2 + {i}", "output": str(2 + i)} for i in range(24)],
        ALPACA,
    ),
    "sharegpt_conversations": (
        "sharegpt.jsonl",
        [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": "hi"}]} for i in range(24)],
        {"eval": []},
    ),
    "trl_prompt_completion_packed": (
        "pc.jsonl",
        [{"prompt": f"Say {i}:", "completion": f" {i}"} for i in range(24)],
        {"eval": [], "packing": True},
    ),
    "a_few_rows_with_nothing_to_train": (
        "some-empty.jsonl",
        [{"prompt": "q", "response": "a"}] * 22 + [{"prompt": "q", "response": ""}] * 2,
        {**NO_EVAL, "format": "instruction"},
    ),
}


@pytest.mark.inprocess
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_and_nothing_is_overwritten(case, tiny_dir, tmp_path, capsys):
    """train refuses with one clear message, and `config --check` refused it first, with
    train's own message among its problems (TRAIN_ONLY: the check passes and says what it
    does not check)."""
    breaker, fragments = CASES[case]
    (rc_check, err_check), (rc, err) = _run_broken(tiny_dir, tmp_path, breaker, capsys)
    assert rc != 0, err
    for fragment in fragments:
        assert fragment in err, (case, err)
    assert "Traceback" not in err and "Traceback" not in err_check
    if case in TRAIN_ONLY:
        assert rc_check == 0 and "Not checked" in err_check, err_check
        return
    assert rc_check != 0, (case, err_check)
    for problem in _problems(err):
        assert problem in _problems(err_check), (case, problem, err_check)


@pytest.mark.inprocess
@pytest.mark.parametrize("case", sorted(GOOD_DATA))
def test_good_data_pass_the_check_and_train(case, tiny_dir, tmp_path, capsys):
    file, rows, data = GOOD_DATA[case]
    good = lambda c, t: _set(c, t, file, rows, data)  # noqa: E731
    (rc_check, err_check), (rc, err) = _run_broken(tiny_dir, tmp_path, good, capsys, max_steps=2)
    assert rc_check == 0 and ": ok (" in err_check, err_check
    assert rc == 0, err
    if case == "a_few_rows_with_nothing_to_train":
        assert "2 of 24 rows have no token to train on" in err_check + err  # said, and dropped


def _problems(err: str) -> list[str]:
    """The problems an error output names: `error: <one>` (train), or `- <each>` lines
    (the check, or several at once), without the launcher's prefix."""
    lines = [x.strip() for x in err.splitlines()]
    listed = [x.removeprefix("- ") for x in lines if x.startswith("- ")]
    if listed:
        return listed
    return [x.removeprefix("error: ") for x in lines if x.startswith("error: ")]


@pytest.mark.inprocess
def test_checkpoint_of_another_config_is_refused(good_checkpoint, tiny_dir, tmp_path, capsys):
    logs = tmp_path / "run/logs"
    logs.mkdir(parents=True)
    (logs / "config.json").write_text(SENTINEL)  # the earlier run's: a refused run writes nothing
    (rc_check, err_check), (rc, err) = _run_broken(
        tiny_dir,
        tmp_path,
        lambda c, t: (c["checkpoint"].update(resume_from=str(good_checkpoint)), c["adapter"].update(lora_rank=8)),
        capsys,
    )
    assert rc_check != 0 and "was written by a different run" in err_check
    assert rc != 0 and "was written by a different run" in err
    assert "adapter.lora_rank: checkpoint 4, this run 8" in err and "config.json" in err
    assert (logs / "config.json").read_text() == SENTINEL and sorted(p.name for p in logs.iterdir()) == ["config.json"]


@pytest.mark.inprocess
def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused(good_checkpoint, tiny_dir, tmp_path, capsys):
    """Without resume_from, a fresh start would overwrite step-00000001 and rotate the earlier
    run's checkpoints away: refused (naming the folder and the ways on), nothing written."""
    ckpts = tmp_path / "run/checkpoints"
    shutil.copytree(good_checkpoint, ckpts / good_checkpoint.name)
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*"))
    cfg = tiny_config_dict(tiny_dir, tmp_path / "run", train={"max_steps": 3}, selection={"steps": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    for fragment in (str(ckpts), "holds checkpoints of an earlier run", "resume_from=auto", "output.overwrite=true"):
        assert fragment in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*")) == before
    # The same with resume_from=auto goes on from it.
    assert main(["train", "--config", str(path), "checkpoint.resume_from=auto"]) == 0
    assert (tmp_path / "run/adapter/adapter_model.safetensors").exists()


@pytest.mark.inprocess
def test_checkpoint_of_another_model_is_refused(good_checkpoint, other_model, tiny_dir, tmp_path, capsys):
    (rc_check, err_check), (rc, err) = _run_broken(
        tiny_dir,
        tmp_path,
        lambda c, t: (
            c["checkpoint"].update(resume_from=str(good_checkpoint)),
            c["model"].update(path=str(other_model)),
        ),
        capsys,
    )
    assert rc_check != 0 and "was written by a different run" in err_check
    assert rc != 0 and "was written by a different run" in err
    assert "num_hidden_layers" in err and "sites" in err


@pytest.mark.inprocess
def test_damaged_checkpoint_is_refused(good_checkpoint, tiny_dir, tmp_path, capsys):
    broken = tmp_path / "step-00000001"
    shutil.copytree(good_checkpoint, broken)
    (broken / "meta.json").write_text("{not json")
    (rc_check, err_check), (rc, err) = _run_broken(
        tiny_dir, tmp_path, lambda c, t: c["checkpoint"].update(resume_from=str(broken)), capsys
    )
    assert rc_check != 0 and "damaged" in err_check
    assert rc != 0 and "damaged" in err


def _run_broken(
    tiny_dir: Path, tmp_path: Path, breaker, capsys, max_steps: int = 3
) -> tuple[tuple[int, str], tuple[int, str]]:
    """``config --check`` and then ``train`` on the broken config: each one's (exit code,
    what it said), output and stderr together."""
    out = tmp_path / "run"
    adapter = out / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(SENTINEL)
    cfg = tiny_config_dict(tiny_dir, out, train={"max_steps": max_steps}, selection={"steps": 1})
    cfg["output"]["overwrite"] = True
    cfg["checkpoint"] = {}
    cfg["data"]["cache_dir"] = str(tmp_path / "data-cache")
    path = tmp_path / "cfg.yaml"
    if breaker == "YAML":
        path.write_text("model: {path: [unclosed\n")
    else:
        breaker(cfg, tmp_path)
        path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc_check = main(["config", "--check", str(path)])
    check = capsys.readouterr()
    rc = main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    # Nothing overwritten: the earlier adapter is intact, no checkpoint was written.
    if rc != 0:
        assert (adapter / "adapter_config.json").read_text() == SENTINEL
        assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json"]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    return (rc_check, check.out + check.err), (rc, err)


def test_sharded_loading_names_a_truncated_weights_file(tiny_dir, tmp_path):
    """FSDP2 / ZeRO-3 read rows themselves (CheckpointReader): the same message as a
    transformers load gets, not a safetensors traceback."""
    import torch

    from wlora_dist.config import ModelConfig
    from wlora_dist.model.checkpoint_reader import CheckpointReader
    from wlora_dist.model.loading import ModelPathError, load_base_model

    model = load_base_model(ModelConfig(path=str(tiny_dir / "model")), torch.device("cpu"))
    with pytest.raises(ModelPathError, match="truncated"):
        CheckpointReader(_truncated_model(tmp_path, str(tiny_dir / "model")), model)
