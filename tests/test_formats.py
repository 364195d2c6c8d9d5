"""Data as the ecosystem writes it: the format told from the columns (data.format: auto),
each brought to the shape the tokeniser reads, sources mixed by weight."""

import json

import pytest

from wlora_dist.config import DataConfig
from wlora_dist.data.formats import detect, load_sources, mix
from wlora_dist.data.rows import IGNORE, DataError
from wlora_dist.data.tokens import tokenize
from wlora_dist.model.tiny import make_tokenizer

TOK = make_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = {
    "messages": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
    "trl": [{"prompt": "hi", "completion": "yo"}],
    "pairs": [{"prompt": "hi", "response": "yo"}],
    "alpaca": [{"instruction": "hi", "input": "there", "output": "yo"}],
    "text": [{"text": "hi yo"}],
}


@pytest.mark.parametrize(
    ("kind", "fmt", "name"),
    [
        ("messages", "chat", "conversations"),
        ("sharegpt", "chat", "ShareGPT"),
        ("trl", "instruction", "prompt / completion (TRL)"),
        ("pairs", "instruction", "prompt / response"),
        ("alpaca", "instruction", "Alpaca"),
        ("text", "text", "plain text"),
    ],
)
def test_each_format_is_told_from_its_columns_and_tokenised(tmp_path, kind, fmt, name):
    path = _jsonl(tmp_path / f"{kind}.jsonl", ROWS[kind] * 40)
    cfg = DataConfig(train=[path], seq_len=128)
    ds, rows_cfg, names = load_sources(cfg, [path])
    assert rows_cfg.format == fmt and name in names[0], names
    out = tokenize(ds, TOK, rows_cfg, [path])
    labels = out[0]["labels"]
    if fmt == "text":
        assert IGNORE not in labels
    else:  # the loss is on the answer only: the prompt's tokens are masked, "yo" is trained
        trained = TOK.decode([t for t, lab in zip(out[0]["input_ids"], labels, strict=True) if lab != IGNORE])
        assert "yo" in trained and "hi" not in trained, trained


def test_sharegpt_and_alpaca_become_the_same_rows_as_their_plain_forms(tmp_path):
    cfg = DataConfig(seq_len=64)
    share, _, _ = load_sources(cfg, [_jsonl(tmp_path / "s.jsonl", ROWS["sharegpt"])])
    plain, _, _ = load_sources(cfg, [_jsonl(tmp_path / "m.jsonl", ROWS["messages"])])
    assert share["messages"] == plain["messages"]
    alpaca, _, _ = load_sources(cfg, [_jsonl(tmp_path / "a.jsonl", ROWS["alpaca"])])
    assert alpaca[0]["prompt"] == "hi\n\nthere" and alpaca[0]["response"] == "yo"


def test_a_named_column_decides_and_must_exist(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", ROWS["pairs"])
    assert detect(["prompt", "response"], DataConfig(text_field="body")).format == "text"
    with pytest.raises(DataError, match=r"column 'body' \(data.text_field\) not in the data"):
        load_sources(DataConfig(text_field="body"), [path])
    with pytest.raises(DataError, match=r"no known format"):
        load_sources(DataConfig(), [_jsonl(tmp_path / "x.jsonl", [{"body": "a"}])])


def test_sources_of_different_kinds_are_refused(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ROWS["messages"])
    b = _jsonl(tmp_path / "b.jsonl", ROWS["text"])
    with pytest.raises(DataError, match="different formats cannot be mixed"):
        load_sources(DataConfig(), [a, b])


def test_weights_set_each_sources_share(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "response": "x"} for i in range(90)])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(10)])
    ds, _, _ = load_sources(DataConfig(), [a, b], seed=3, weights=[1, 1])
    prompts = ds["prompt"]
    assert len(prompts) == 100
    assert sum(p.startswith("a") for p in prompts) == 50 and sum(p.startswith("b") for p in prompts) == 50
    assert len({p for p in prompts if p.startswith("b")}) == 10  # every row of the small source, then resampled
    again, _, _ = load_sources(DataConfig(), [a, b], seed=3, weights=[1, 1])
    assert again["prompt"] == prompts  # seeded


def test_mix_keeps_the_total(tmp_path):
    import datasets

    parts = [datasets.Dataset.from_list([{"x": i} for i in range(n)]) for n in (7, 30, 3)]
    out = mix(parts, [0.5, 0.25, 0.25], seed=0)
    assert [len(p) for p in out] == [20, 10, 10]


def test_weights_must_match_the_sources():
    from wlora_dist.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"data.weights: \[1.0\] must be one number > 0 per data.train source"):
        config_from_dict({"model": {"path": "m"}, "data": {"train": ["a.jsonl", "b.jsonl"], "weights": [1]}})


def test_preview_prints_rows_with_the_trained_tokens_marked(tiny_dir, tmp_path, capsys):
    import yaml

    from wlora_dist.cli import main

    from .conftest import tiny_config_dict

    share = _jsonl(tmp_path / "s.jsonl", ROWS["sharegpt"] * 3)
    cfg = tiny_config_dict(tiny_dir, tmp_path / "run")
    cfg["data"] = {"train": [share], "seq_len": 128}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["preview", "--config", str(path), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert f"== {share}: ShareGPT conversations" in out and "-> data.format chat" in out
    assert out.count("-- row ") == 2 and "[[yo" in out and "[[hi" not in out, out
    assert main(["preview", "--config", str(path), "--rows", "1", "--ids"]) == 0
    assert "*" in capsys.readouterr().out


def test_the_preflight_reads_rows_as_training_does_with_an_explicit_format(tiny_dir, tmp_path):
    """data.format: chat over ShareGPT turns trains (the turns are normalised); the
    preflight's preview of the first rows must not refuse it."""
    from wlora_dist.config import config_from_dict
    from wlora_dist.data.pipeline import train_eval_split
    from wlora_dist.model.loading import load_tokenizer
    from wlora_dist.training.preflight import check_data_rows

    from .conftest import tiny_config_dict

    share = _jsonl(tmp_path / "s.jsonl", ROWS["sharegpt"] * 4)
    raw = tiny_config_dict(tiny_dir, tmp_path / "run")
    raw["data"] = {"train": [share], "format": "chat", "seq_len": 128, "eval_fraction": 0}
    cfg = config_from_dict(raw)
    rows, _ = train_eval_split(cfg.data, 0)
    assert rows[0]["messages"][0] == {"role": "user", "content": "hi"}  # training normalises the turns
    check_data_rows(cfg, load_tokenizer(cfg.model))  # and so does the preflight


def test_a_trl_completion_keeps_its_own_leading_space(tmp_path):
    """TRL's completions carry their separator (" blue."): the plain template adds a space
    only where neither side has one, so the trained tokens are the completion's own."""
    rows = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Q:\n", "response": "A"}]
    rows += [{"prompt": "Say", "response": "hi"}]
    for row in rows:
        path = _jsonl(tmp_path / "r.jsonl", [row] * 4)
        cfg = DataConfig(train=[path], seq_len=64, template="plain")
        ds, rows_cfg, _ = load_sources(cfg, [path])
        ids = tokenize(ds, TOK, rows_cfg, [path])[0]["input_ids"]
        answer = row.get("completion", row.get("response"))
        sep = "" if answer.startswith(" ") or row["prompt"].endswith("\n") else " "
        assert TOK.decode(ids) == row["prompt"] + sep + answer + TOK.eos_token, TOK.decode(ids)
