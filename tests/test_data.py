"""Data: the three formats, sharding, and clear errors for bad data."""

import json

import pytest

from wlora_dist.config import DataConfig
from wlora_dist.data.pipeline import collate, make_loader, train_eval_split
from wlora_dist.data.rows import IGNORE, DataError, load_rows
from wlora_dist.data.tokens import tokenize
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
    ds = tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)], format="instruction", template="plain"))
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
    f = _jsonl(tmp_path / "i.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "x", "response": "y" * 50}])
    cfg = DataConfig(train=[str(f)], format="instruction", seq_len=20, truncate=False, template="plain")
    with pytest.raises(DataError, match=r"row 1: \d+ tokens > data.seq_len=20"):
        tokenize(load_rows([str(f)]), TOK, cfg)
    cfg = cfg.model_copy(update={"truncate": True})
    assert max(len(r) for r in tokenize(load_rows([str(f)]), TOK, cfg)["input_ids"]) == 20


def test_wrong_column_names_the_field_and_the_columns(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"body": "abc"}])
    with pytest.raises(DataError, match=r"column 'text' \(data.text_field\).*columns are \['body'\]"):
        tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)], format="text"))
    with pytest.raises(DataError, match=r"columns \['body'\]: no known format .*data\.text_field"):
        tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)]))  # format auto


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


def test_instruction_goes_through_the_chat_template_when_there_is_one(tmp_path):
    """auto: user turn = prompt, assistant turn = response; the loss on the assistant turn."""
    f = _jsonl(tmp_path / "i.jsonl", [{"prompt": "2+2?", "response": "4"}])
    ds = tokenize(load_rows([str(f)]), TOK, DataConfig(train=[str(f)], format="instruction"))
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert TOK.decode(ids) == "<s>user: 2+2?</s>\n<s>assistant: 4</s>\n"
    assert TOK.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]) == "4</s>\n"
    bare = make_tokenizer()
    bare.chat_template = None  # a base model's tokenizer: auto falls back to plain
    ds = tokenize(load_rows([str(f)]), bare, DataConfig(train=[str(f)], format="instruction"))
    assert TOK.decode(ds[0]["input_ids"]) == "2+2? 4</s>"
    with pytest.raises(DataError, match=r"data.template=chat needs a tokenizer with a chat template"):
        tokenize(load_rows([str(f)]), bare, DataConfig(train=[str(f)], format="instruction", template="chat"))


def _qa_rows(n):
    return [{"prompt": f"q{i} " + "x" * (i % 7), "response": f"answer {i}" + "y" * (i % 5)} for i in range(n)]


def test_packing_fills_rows_in_order_with_restarting_positions(tmp_path):
    f = _jsonl(tmp_path / "i.jsonl", _qa_rows(30))
    cfg = DataConfig(train=[str(f)], format="instruction", seq_len=96)
    single = tokenize(load_rows([str(f)]), TOK, cfg)
    cfg = cfg.model_copy(update={"packing": True})
    packed = tokenize(load_rows([str(f)]), TOK, cfg)
    assert len(packed) <= len(single) / 2
    assert all(len(r) <= 96 for r in packed["input_ids"])
    # Concatenated, the packed rows are the single rows in order; positions restart per row;
    # each row's first label is IGNORE (unpacked, it is never predicted).
    flat = [t for r in packed["input_ids"] for t in r]
    assert flat == [t for r in single["input_ids"] for t in r]
    starts = [i for r in packed["position_ids"] for i, p in enumerate(r) if p == 0]
    assert len(starts) == len(single)
    want = [lab for r in single["labels"] for lab in [IGNORE, *r[1:]]]
    assert [lab for r in packed["labels"] for lab in r] == want
    batch = collate([packed[0], packed[1]], TOK.pad_token_id)
    assert "attention_mask" not in batch and int(batch["num_tokens"]) == len(packed[0]["input_ids"]) + len(
        packed[1]["input_ids"]
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss_per_row(tmp_path, attn):
    """The same tiny Llama on the rows one by one and packed: every row's token losses agree,
    so no token saw another row's; without the position ids (one causal sequence) they do not."""
    import torch

    from wlora_dist.model.tiny import make_model

    msgs = [
        [
            {"role": "user", "content": f"hi {i}" * (1 + i % 3)},
            {"role": "assistant", "content": f"ok {i}" * (1 + i % 2)},
        ]
        for i in range(12)
    ]
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in msgs])
    cfg = DataConfig(train=[str(f)], format="chat", seq_len=128)
    single = tokenize(load_rows([str(f)]), TOK, cfg)
    cfg = cfg.model_copy(update={"packing": True})
    packed = tokenize(load_rows([str(f)]), TOK, cfg)
    model = make_model(len(TOK), hidden=32, layers=2)
    model.config._attn_implementation = attn
    # As the trainer has it: with a KV cache transformers ignores the position ids' restarts.
    model.config.use_cache = False
    ce = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=IGNORE)

    def token_losses(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}).logits
        return ce(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).view(logits.shape[0], -1)

    want = []
    for r in single:
        b = collate([r], TOK.pad_token_id)
        lab = b["labels"][0, 1:]
        want.append(token_losses(b)[0][lab != IGNORE])
    got, leaked = [], []
    b = collate(list(packed), TOK.pad_token_id)
    losses = token_losses(b)
    without = token_losses({k: v for k, v in b.items() if k != "position_ids"})
    for row, pos in enumerate(b["position_ids"]):
        lab = b["labels"][row, 1:]
        seg = (pos == 0).long().cumsum(0)[1:]  # which source row each shifted label belongs to
        for s in seg[lab != IGNORE].unique().tolist():
            mask = (seg == s) & (lab != IGNORE)
            got.append(losses[row][mask])
            leaked.append(without[row][mask])
    assert len(got) == len(want) == len(msgs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    assert any((g - w).abs().max() > 1e-3 for g, w in zip(leaked, want, strict=True))


# ---------------------------------------------------------------- tokenise once


def _tokenise_counted(monkeypatch):
    from wlora_dist.data import pipeline

    calls = []
    real = pipeline.tokenize

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "tokenize", counted)
    return calls


def test_rank0_tokenises_once_and_other_ranks_and_reruns_read_its_copy(tmp_path, monkeypatch):
    from wlora_dist.data import pipeline

    f = _jsonl(tmp_path / "t.jsonl", [{"text": f"row {i} " * 9} for i in range(60)])
    cfg = DataConfig(train=[str(f)], seq_len=32, eval_fraction=0.1)
    root = tmp_path / "cache"
    calls = _tokenise_counted(monkeypatch)
    statuses = []
    monkeypatch.setattr("wlora_dist.distributed.env.gather_objects", lambda s: statuses.append(s) or [statuses[0]])
    train0, eval0 = pipeline.tokenise_once(cfg, 0, TOK, root, rank=0)
    assert len(calls) == 2  # train and eval, on rank 0
    (key,) = [p.name for p in root.iterdir()]
    assert statuses[0] == {"path": str(root / key)}
    train1, eval1 = pipeline.tokenise_once(cfg, 0, TOK, root, rank=1)  # rank 1 gets rank 0's status
    assert len(calls) == 2 and train1["input_ids"] == train0["input_ids"] and eval1["input_ids"] == eval0["input_ids"]
    statuses.clear()
    pipeline.tokenise_once(cfg, 0, TOK, root, rank=0)  # a rerun / resume: nothing tokenised
    assert len(calls) == 2
    # Anything that changes the tokens is a new key: a setting, the tokenizer, the file.
    cfg = cfg.model_copy(update={"seq_len": 16})
    statuses.clear()
    pipeline.tokenise_once(cfg, 0, TOK, root, rank=0)
    other = make_tokenizer()
    other.chat_template = "{{ messages }}"
    statuses.clear()
    pipeline.tokenise_once(cfg, 0, other, root, rank=0)
    _jsonl(f, [{"text": f"new {i} " * 9} for i in range(60)])
    statuses.clear()
    pipeline.tokenise_once(cfg, 0, other, root, rank=0)
    assert len(calls) == 8 and len(list(root.iterdir())) == 4


def test_a_rank_that_cannot_see_the_copy_tokenises_itself(tmp_path, monkeypatch, caplog):
    from wlora_dist.data import pipeline

    f = _jsonl(tmp_path / "t.jsonl", [{"text": f"row {i} " * 9} for i in range(40)])
    cfg = DataConfig(train=[str(f)], seq_len=32, eval_fraction=0)
    monkeypatch.setattr("wlora_dist.distributed.env.gather_objects", lambda s: [{"path": str(tmp_path / "elsewhere")}])
    calls = _tokenise_counted(monkeypatch)
    with caplog.at_level("WARNING", logger="wlora_dist"):
        train, held = pipeline.tokenise_once(cfg, 0, TOK, tmp_path / "cache", rank=1)
    assert len(calls) == 1 and held is None and len(train) > 0
    assert "cannot see rank 0's tokenised data" in caplog.text


def test_rank0_data_error_reaches_every_rank(tmp_path, monkeypatch):
    from wlora_dist.data import pipeline

    f = _jsonl(tmp_path / "t.jsonl", [{"body": "x"}])
    cfg = DataConfig(train=[str(f)], eval_fraction=0)
    sent = []
    monkeypatch.setattr("wlora_dist.distributed.env.gather_objects", lambda s: sent.append(s) or [s])
    with pytest.raises(DataError, match=r"data\.text_field"):
        pipeline.tokenise_once(cfg, 0, TOK, tmp_path / "cache", rank=0)
    monkeypatch.setattr("wlora_dist.distributed.env.gather_objects", lambda s: [sent[0]])
    with pytest.raises(DataError, match=r"found by rank 0.*data.text_field"):
        pipeline.tokenise_once(cfg, 0, TOK, tmp_path / "cache", rank=1)


def test_a_full_disk_or_a_crash_mid_write_leaves_no_half_cache(tmp_path, monkeypatch, caplog):
    import errno

    import datasets

    from wlora_dist.data import cache, pipeline

    f = _jsonl(tmp_path / "t.jsonl", [{"text": f"row {i} " * 9} for i in range(40)])
    cfg = DataConfig(train=[str(f)], seq_len=32, eval_fraction=0)
    root = tmp_path / "cache"
    monkeypatch.setattr("wlora_dist.distributed.env.gather_objects", lambda s: [s])
    real_save = datasets.Dataset.save_to_disk

    def full(self, path, **k):
        real_save(self, path, **k)  # part of it is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    with caplog.at_level("WARNING", logger="wlora_dist"):
        train, _ = pipeline.tokenise_once(cfg, 0, TOK, root, rank=0)
    assert len(train) > 0 and "No space left on device" in caplog.text
    assert list(root.iterdir()) == []  # neither the key nor a partial folder
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    # A crash mid-write leaves a .partial- folder; a key folder without DONE is never read.
    pipeline.tokenise_once(cfg, 0, TOK, root, rank=0)
    (key,) = list(root.iterdir())
    (key / "DONE").unlink()
    stale = root / f".partial-{key.name}-99999"
    stale.mkdir()
    assert cache.load(key) is None
    calls = _tokenise_counted(monkeypatch)
    import shutil

    shutil.rmtree(key)
    pipeline.tokenise_once(cfg, 0, TOK, root, rank=0)
    assert len(calls) == 1 and not stale.exists() and (key / "DONE").is_file()


def test_rows_with_nothing_to_train_are_dropped_and_counted_or_refused(tmp_path, caplog):
    """An empty reply or a reply cut away by truncation: dropped and named (the file's own
    rows, in order) up to data.max_untrained_share, refused beyond it; no such row is left
    to make a NaN loss."""
    rows = [{"prompt": "q", "response": "a"}] * 18 + [
        {"prompt": "q", "response": " "},
        {"prompt": "x" * 80, "response": "b"},
    ]
    f = _jsonl(tmp_path / "i.jsonl", rows)
    cfg = DataConfig(train=[str(f)], format="instruction", seq_len=40, template="plain")
    with caplog.at_level("WARNING", logger="wlora_dist"):
        out = tokenize(load_rows([str(f)]), TOK, cfg, [str(f)])
    assert len(out) == 18 and all(any(x != IGNORE for x in r[1:]) for r in out["labels"])
    assert set(out.column_names) == {"input_ids", "labels"}
    said = caplog.text
    assert "2 of 20 rows have no token to train on" in said and f"{f} row 18; {f} row 19" in said
    with pytest.raises(DataError, match=r"2 of 20 rows .* more than data.max_untrained_share=0.05"):
        tokenize(load_rows([str(f)]), TOK, cfg.model_copy(update={"max_untrained_share": 0.05}), [str(f)])
    kept = tokenize(load_rows([str(f)]), TOK, cfg, [str(f)], whole=False)  # a preview: every row, as it is
    assert len(kept) == 20


def test_eval_is_sized_to_the_ranks_instead_of_switched_off():
    from wlora_dist.data.pipeline import eval_micro_batch, fill_problem, steps_per_epoch

    assert eval_micro_batch(10, 4, 4, given=True) == 2  # 10 rows on 4 ranks: batches of 2, not no eval
    assert eval_micro_batch(100, 4, 4, given=True) == 4
    with pytest.raises(DataError, match=r"3 rows after tokenising, fewer than the 4 ranks.*data.eval_fraction"):
        eval_micro_batch(3, 4, 4, given=False)
    assert fill_problem(15, 4, 4) and "cannot fill one micro-batch of 4 on each of 4 ranks" in fill_problem(15, 4, 4)
    assert fill_problem(16, 4, 4) is None
    assert steps_per_epoch(100, 4, 2, 3) == 4  # 50 rows a rank, 12 micro-batches, 4 optimizer steps


def test_alpaca_input_is_never_dropped_when_the_fields_are_named(tmp_path):
    """data.format=instruction with prompt_field=instruction on Alpaca rows: the input
    column, which holds the question, is appended to the prompt as format auto does."""
    from wlora_dist.data.formats import shape_rows

    rows = [{"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"}]
    f = _jsonl(tmp_path / "a.jsonl", rows)
    named = DataConfig(train=[str(f)], format="instruction", prompt_field="instruction", response_field="output")
    for cfg in (named, DataConfig(train=[str(f)])):
        ds, _, _ = shape_rows(load_rows([str(f)]), cfg)
        assert ds[0]["prompt"] == "Add the numbers.\n\n2 + 3" and ds[0]["response"] == "5", cfg.format
