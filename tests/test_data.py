"""Data: the three formats, sharding, and clear errors for bad data."""

import json

import pytest

from wlora_dist.config import DataConfig
from wlora_dist.data.pipeline import IGNORE, DataError, collate, load_rows, make_loader, tokenize, train_eval_split
from wlora_dist.model.tiny import make_tokenizer

TOK = make_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_is_packed_into_full_blocks(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "abcdefghij" * 3} for _ in range(10)])
    ds = tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)], seq_len=16))
    # 10 rows x (30 bytes + EOS) = 310 tokens -> 19 full blocks of 16
    assert len(ds) == 19
    assert all(len(r) == 16 for r in ds["input_ids"])
    assert ds[0]["labels"] == ds[0]["input_ids"]
    assert ds[1]["input_ids"][14] == TOK.eos_token_id  # 31st token of the stream ends row 0


def test_instruction_masks_the_prompt(tmp_path):
    f = _jsonl(tmp_path / "i.jsonl", [{"prompt": "2+2?", "response": "4"}])
    ds = tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)], format="instruction"))
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert TOK.decode(ids) == "2+2? 4</s>"
    n_prompt = len(TOK("2+2?")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and TOK.decode(ids[n_prompt:]) == " 4</s>"


def test_chat_trains_only_on_assistant_turns(tmp_path):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "ok"},
    ]
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    ds = tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)], format="chat"))
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    trained = TOK.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert trained == "yo</s>\nok</s>\n"


def test_too_long_rows_error_names_the_row_unless_truncating(tmp_path):
    f = _jsonl(tmp_path / "i.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "x" * 50, "response": "y"}])
    cfg = DataConfig(train=[str(f)], format="instruction", seq_len=20, truncate=False)
    with pytest.raises(DataError, match=r"row 1: \d+ tokens > data.seq_len=20"):
        tokenize(load_rows([str(f)]), TOK, cfg)
    cfg.truncate = True
    assert max(len(r) for r in tokenize(load_rows([str(f)]), TOK, cfg)["input_ids"]) == 20


def test_wrong_column_names_the_field_and_the_columns(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"body": "abc"}])
    with pytest.raises(DataError, match=r"column 'text' \(data.text_field\).*columns are \['body'\]"):
        tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)]))


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="does not exist"):
        load_rows(["./not/here"])  # written like a path: never tried as a hub id
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty|no rows|could not be read"):
        load_rows([str(empty)])
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"not valid UTF-8 at byte 28 \(line 2\)"):
        load_rows([str(latin)])


def test_csv_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = {"text": ["one", "two", "three"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in ("d.csv", "d.parquet", "saved"):
        assert load_rows([str(tmp_path / src)])["text"] == rows["text"], src


def test_ranks_read_disjoint_shards_deterministically():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[i] * 3 for i in range(64)], "labels": [[i] * 3 for i in range(64)]})
    seen = []
    for rank in range(2):
        loader = make_loader(ds, 4, TOK.pad_token_id, rank, 2, seed=3, shuffle=True)
        seen.append([int(row[0]) for b in loader for row in b["input_ids"]])
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))
    again = make_loader(ds, 4, TOK.pad_token_id, 0, 2, seed=3, shuffle=True)
    assert [int(row[0]) for b in again for row in b["input_ids"]] == seen[0]
    assert seen[0] != sorted(seen[0])  # shuffled


def test_collate_pads_with_ignore_labels():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [IGNORE]}], 0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_eval_split_is_taken_before_packing(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": f"{i}"} for i in range(100)])
    train, held = train_eval_split(DataConfig(train=[str(f)], eval_fraction=0.1), seed=0)
    assert len(train) == 90 and len(held) == 10
    assert not set(train["text"]) & set(held["text"])
