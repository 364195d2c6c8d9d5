"""The real-model study (benchmarks/real_llm.py) in miniature: the GGUF conversion on a tiny
GGUF file written here, the arithmetic task, each method's config, and the protocol (rates
per method, seeds, kept sets retrained, a resumed study running nothing twice)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import real_llm
from benchmarks.real_model import arithmetic
from benchmarks.real_model.convert import convert


def test_each_method_is_the_config_it_claims():
    st = real_llm.Study()  # SmolLM2: 30 layers, n = 210, K = 52 (n / 4), rank 8
    assert (st.n, st.k) == (210, 52)
    sections = {m: real_llm.method_sections(m, st, 0, kept=["model.layers.0.mlp.up_proj"]) for m in real_llm.METHODS}
    assert sections["lora-all"] == {"selection": {"method": "none"}}
    assert sections["lora-equal"]["adapter"] == {"lora_rank": 2}  # 210 x 2 = 420 ~ 52 x 8 = 416
    assert sections["wlora"]["selection"] == {"method": "topk", "k": 52, "schedule": "main"}
    assert sections["wlora-authors"]["selection"]["preset"] == "authors"
    assert sections["wlora-authors"]["selection"]["schedule"] == "main"  # one schedule shape for all
    assert sections["wlora-plus"] == {
        "selection": {"method": "topk", "k": 52, "schedule": "main", "rounds": 2},
        "adapter": {"lora_rank": 2},
    }  # 210 at rank 2 -> 105 at 4 -> 52 at 8
    assert sections["kept-retrained"]["adapter"] == {"target_modules": ["layers.0.mlp.up_proj"]}
    for m in ("wlora-head", "lora-all-head", "lora-equal-head", "random-head"):
        assert sections[m]["adapter"]["include_lm_head"] is True, m
    assert sections["head-only"]["adapter"] == {"target_modules": ["lm_head"]}
    assert {"lora-equal-head"} == real_llm.HEAD_AT_RANK  # its head at rank 8, the rest at 2
    qv, mlp = (sections[m]["adapter"]["target_modules"] for m in ("habit-qv", "habit-mlp"))
    assert len(qv) == len(mlp) == 52 and {t.split(".")[1] for t in qv} == {str(i) for i in range(4, 30)}
    assert all(".mlp." in t for t in mlp) and "layers.29.mlp.down_proj" in mlp
    r0, r1 = (real_llm.method_sections("random", st, s)["adapter"]["target_modules"] for s in (0, 1))
    assert len(set(r0)) == 52 and r0 != r1
    assert r0 == real_llm.method_sections("random", st, 0)["adapter"]["target_modules"]  # seeded


def test_the_arithmetic_splits_are_disjoint_and_their_answers_right():
    parts = arithmetic.splits(300, 50, 50, seed=0)
    prompts = [{r["prompt"] for r in parts[name]} for name in ("train", "validation", "test")]
    assert [len(p) for p in prompts] == [300, 50, 50]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    for r in parts["train"][:100]:
        numbers = [int(x) for x in re.findall(r"\d+", r["prompt"])]
        text, answer = r["prompt"], int(r["completion"])
        if "gets" in text:
            assert answer == numbers[0] + numbers[1]
        elif "gives away" in text:
            assert answer == numbers[0] - numbers[1] and answer > 0
        elif "bags" in text:
            assert answer == numbers[0] * numbers[1]
        else:
            assert answer == numbers[0] + numbers[1] - numbers[2] and answer > 0
    assert arithmetic.splits(300, 50, 50)["test"] == arithmetic.splits(10, 5, 50)["test"]  # test rows fixed
    assert arithmetic.exact_match([" 28\nQ:", "12", " none", "-3"], [{"completion": " 28"}, {"completion": " 21"},
                                  {"completion": " 5"}, {"completion": " -3"}]) == 0.5  # fmt: skip


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 byte tokens of a byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    table = dict(zip(bs + extra, [chr(c) for c in bs + [256 + i for i in range(len(extra))]], strict=True))
    return [table[b] for b in range(256)]


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
    """A Llama GGUF file as llama.cpp writes one (float32 tensors under its names, a GPT-2
    BPE tokenizer in the metadata), tiny and random."""
    import gguf

    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>", *_byte_tokens(), "Ġt", "he"]
    inter, d = 2 * hidden, hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(d)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (0.05 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * d, hidden)),
                            ("attn_v", (kv_heads * d, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)),
                            ("ffn_down", (hidden, inter))):  # fmt: skip
            tensor(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.inprocess
def test_a_gguf_file_becomes_a_folder_that_loads_as_the_gguf_does(tmp_path):
    """What transformers' GGUF loader makes of the file, written as an ordinary HF folder:
    the same logits and tokens, once (a second conversion of the same file writes nothing),
    and never a half-written folder that looks finished."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = tmp_path / "gguf" / "tiny.gguf"
    gguf_file.parent.mkdir()
    write_tiny_gguf(gguf_file)
    out = convert(gguf_file, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf", "model"]  # no .partial left behind
    source = json.loads((out / "source.json").read_text())
    assert source["file"] == "tiny.gguf" and source["bytes"] == gguf_file.stat().st_size
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok_theirs = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tok_ours = AutoTokenizer.from_pretrained(str(out))
    text = "the cat sat on the mat"
    assert tok_ours(text)["input_ids"] == tok_theirs(text)["input_ids"]
    ids = torch.tensor([tok_ours(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)
    assert ours.config.num_hidden_layers == 2 and not hasattr(ours.config, "quantization_config")
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert convert(gguf_file, out) == out and weights.stat().st_mtime_ns == mtime  # done once


def test_the_protocol_chooses_each_rate_then_runs_the_seeds_and_resumes(tmp_path, monkeypatch):
    """run_one replaced (nothing trains): a method's rate is the grid's lowest validation loss
    on seed 0, a winner at the grid's edge gets the next rate beyond it tried, the seeds run
    at the chosen rate, kept-retrained retrains the set wlora kept in the same seed, and a
    second pass over the same folder runs nothing."""
    calls: list[tuple] = []

    def fake_run(method, lr, seed, study, data, test, tokenizer, work, kept=None, validate=True, keep_adapter=None):
        calls.append((method, lr, seed, tuple(kept or ())))
        # seed 0: a trial (validated, its adapter kept, no test rows); the others: tested, not validated
        assert (seed == 0) == validate == (keep_adapter is not None) == (test is None)
        if keep_adapter is not None:
            keep_adapter.mkdir(parents=True)
        best = {"wlora": 2e-3, "lora-all": 4e-3, "kept-retrained": 1e-3}[method]  # lora-all: past the grid
        loss = 1.0 + abs(np.log2(lr / best)) + 0.01 * seed
        kept_set = [f"model.layers.{seed}.mlp.up_proj"] if method == "wlora" else ["all"]
        val, test_loss = (loss, float("nan")) if seed == 0 else (float("nan"), loss)
        return real_llm.RunResult(method, lr, seed, val, test_loss, 0.1 * seed, kept_set, 10, 1.0, study.k, 2)

    scored: list[str] = []

    def fake_score(study, adapter, test, tokenizer):
        scored.append(adapter.name)
        return 1.0, 0.0

    monkeypatch.setattr(real_llm, "run_one", fake_run)
    monkeypatch.setattr(real_llm, "score_adapter", fake_score)
    monkeypatch.setattr(real_llm, "TestSet", type("T", (), {"build": staticmethod(lambda rows, tok: "test rows")}))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    study = real_llm.replace(real_llm.MINI, lrs=(1e-3, 2e-3), extend_edges=True)
    methods = ["kept-retrained", "lora-all", "wlora"]  # kept-retrained is run after wlora whatever the order
    saved = real_llm.study_runs(study, methods, tmp_path)
    assert saved["chosen_lr"] == {"lora-all": 4e-3, "wlora": 2e-3, "kept-retrained": 1e-3}
    assert sorted(saved["trials"]["lora-all"]) == ["0.001", "0.002", "0.004", "0.008"]  # 4e-3 won: 8e-3 tried
    assert sorted(saved["trials"]["wlora"]) == ["0.001", "0.002", "0.004"]  # 2e-3 won at the edge: 4e-3 tried
    kept_runs = [c for c in calls if c[0] == "kept-retrained"]
    assert {(c[2], c[3]) for c in kept_runs} == {
        (0, ("model.layers.0.mlp.up_proj",)),
        (1, ("model.layers.1.mlp.up_proj",)),
    }
    rows = {r["method"]: r for r in real_llm.table(saved)}
    # paired per seed: (0.01 s + 1.0 + |log2(lr / best)|) differences; EM 0.1 s on both sides
    assert rows["wlora"]["em_vs_lora-all"] == pytest.approx((0.0, 0.0))
    assert rows["kept-retrained"]["seeds"] == 2 and rows["kept-retrained"]["lr"] == 1e-3
    assert scored == ["lora-all-0.004", "wlora-0.002", "kept-retrained-0.001"]  # the chosen trials only
    assert saved["results"]["wlora"][0]["test_loss"] == 1.0  # seed 0's test scores: the chosen trial's
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())  # trials' removed
    n_calls = len(calls)
    again = real_llm.study_runs(study, methods, tmp_path)  # resumed: read back from partial.jsonl
    assert len(calls) == n_calls and json.dumps(again["results"]) == json.dumps(saved["results"]) and len(scored) == 3
    assert "| kept-retrained | 0.001 |" in real_llm.markdown(saved)


@pytest.mark.inprocess
def test_two_methods_really_trained_and_scored(tiny_dir, tmp_path):
    """wlora and lora-equal-head through the project's trainer on the tiny model, one rate,
    one seed: K kept, the head's adapter at rank r beside rank-2 adapters, the test rows
    scored (answer loss, greedy exact match), the plot drawn."""
    study = real_llm.replace(real_llm.MINI, model=str(tiny_dir / "model"), lrs=(2e-3,), seeds=1)
    saved = real_llm.study_runs(study, ["wlora", "lora-equal-head"], tmp_path)
    wlora, head = (real_llm.RunResult(**saved["results"][m][0]) for m in ("wlora", "lora-equal-head"))
    assert len(wlora.kept) == study.k == 4 and len(head.kept) == study.n + 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(study.model)
    linears = [m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
    head_params = 8 * (model.config.hidden_size + model.config.vocab_size)  # lm_head's A and B at rank 8
    assert head.trainable == sum(2 * (m.in_features + m.out_features) for m in linears) + head_params
    for r in (wlora, head):
        assert 0 < r.test_loss < 20 and 0 <= r.test_exact_match <= 1 and 0 < r.validation_loss < 20
    # A trial is scored from its exported adapter (a standard peft folder, gates folded in):
    # the same scores as the model in memory.
    data = arithmetic.write(tmp_path / "data", study.train_rows, study.validation_rows, study.test_rows)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(study.model)
    test = real_llm.TestSet.build([json.loads(x) for x in data["test"].read_text().splitlines()], tokenizer)
    kept = real_llm.run_one(
        "wlora", 2e-3, 1, study, data, test, tokenizer, tmp_path / "work", keep_adapter=tmp_path / "kept"
    )
    from_disk = real_llm.score_adapter(study, tmp_path / "kept", test, tokenizer)
    assert from_disk == pytest.approx((kept.test_loss, kept.test_exact_match), rel=1e-5)
    real_llm.plot(saved, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_the_sweep_runs_each_point_at_its_methods_rate_and_pairs_it_with_random(tmp_path, monkeypatch):
    """run_one replaced: K as shares of n for wlora and random (each at its own rate from the
    main table), T and P for wlora; a point the main table ran is read back; the table pairs
    wlora with random at the same K, per seed."""
    calls: list[tuple] = []

    def fake_run(method, lr, seed, study, data, test, tokenizer, work, kept=None, validate=True, keep_adapter=None):
        assert not validate and test is not None
        calls.append((method, lr, seed, study.k, study.selection_steps, study.project_every))
        em = 0.5 + (0.1 if method == "wlora" else 0.0) + 0.01 * seed + 0.001 * study.k
        return real_llm.RunResult(
            method, lr, seed, float("nan"), 1 - em, em, [], study.k, 1.0, study.k, study.selection_steps,
            study.project_every,
        )  # fmt: skip

    monkeypatch.setattr(real_llm, "run_one", fake_run)
    monkeypatch.setattr(real_llm, "TestSet", type("T", (), {"build": staticmethod(lambda rows, tok: "test rows")}))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    study = real_llm.replace(real_llm.MINI, layers=4, k_fraction=0.25, selection_steps=4, seeds=2)  # n 28, K 7
    runs = real_llm.Runs(tmp_path / "partial.jsonl")
    for seed in range(2):  # the main table's wlora runs at K = 7, T = 4
        runs.put(real_llm.RunResult("wlora", 2e-3, seed, 1.0, 0.3, 0.7, [], 7, 1.0, 7, 4))
    saved = real_llm.sweep(study, {"wlora": 2e-3, "random": 4e-3}, tmp_path, [0.25, 0.5], [2, 4], [0, 1], 2)
    points = [(r["method"], r["k"], r["selection_steps"], r["project_every"]) for r in saved["sweep"]]
    assert points == [
        ("wlora", 7, 4, None), ("wlora", 14, 4, None), ("wlora", 7, 2, None), ("random", 7, 4, None),
        ("random", 14, 4, None), ("wlora", 7, 4, 0), ("wlora", 7, 4, 1),
    ]  # fmt: skip
    assert ("wlora", 2e-3, 0, 7, 4, None) not in calls and len(calls) == 2 * 6  # the main table's point read back
    assert {c[1] for c in calls if c[0] == "random"} == {4e-3} and {c[1] for c in calls if c[0] == "wlora"} == {2e-3}
    text = real_llm.sweep_markdown(saved)
    # K 14: wlora - random = 0.1 exactly in every seed; K 7: the main table's 0.7 against 0.5 + 0.01 s + 0.007
    assert "| wlora | 14 | 4 | two | 0.619 ± 0.007 | 0.381 ± 0.007 | +0.100 ± 0.000 |" in text
    assert "| wlora | 7 | 4 | two | 0.700 ± 0.000 |" in text and "+0.188 ± 0.007" in text
    assert "| wlora | 7 | 4 | once |" in text and "| wlora | 7 | 4 | 1 |" in text
    real_llm.sweep_plot(saved, tmp_path / "sweep.png", saved["sweep"][0]["runs"])
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
