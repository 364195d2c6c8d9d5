"""The selection-vs-chance benchmark (benchmarks/chance.py) and the wide planted study
(benchmarks/synthetic.py --wide) in miniature, so neither script can rot."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import chance
from benchmarks.synthetic import Shape, _corrected, _quota_topk, wide_markdown, wide_study


def test_each_method_is_the_config_it_claims():
    task = chance.Task()  # 8 layers: n = 56, K = 14, rank 8
    assert chance.method_sections("lora-all", task, 0) == {"selection": {"method": "none"}}
    assert chance.method_sections("lora-all-equal", task, 0)["adapter"] == {"lora_rank": 2}  # 56 x 2 = 14 x 8
    plus = chance.method_sections("wlora-plus", task, 0)
    assert plus == {"selection": {"method": "topk", "rounds": 2}, "adapter": {"lora_rank": 2}}  # 56 -> 14 at rank 8
    qv = chance.method_sections("habit-qv", task, 0)["adapter"]["target_modules"]
    assert len(qv) == 14 and {t.split(".")[1] for t in qv} == {str(i) for i in range(1, 8)}
    assert all(t.endswith(("q_proj", "v_proj")) for t in qv)
    mlp = chance.method_sections("habit-mlp", task, 0)["adapter"]["target_modules"]
    assert len(mlp) == 14 and all(".mlp." in t for t in mlp) and "layers.7.mlp.down_proj" in mlp
    r0, r1 = (chance.method_sections("random", task, s)["adapter"]["target_modules"] for s in (0, 1))
    assert len(set(r0)) == len(set(r1)) == 14 and r0 != r1
    assert r0 == chance.method_sections("random", task, 0)["adapter"]["target_modules"]  # seeded


@pytest.mark.inprocess
def test_the_comparison_in_miniature(tmp_path):
    args = argparse.Namespace(
        mini=True, seeds=1, methods=list(chance.METHODS), steps=6, pretrain_steps=3,
        cache=tmp_path / "cache", out=tmp_path / "out",
    )  # fmt: skip
    results, rows, text = chance.run(args)
    by = {r.method: r for r in results}
    assert set(by) == {"no fine-tuning", *chance.METHODS}
    task_k = 14 // 4  # the miniature: 2 layers, n = 14
    for m in (
        "wlora",
        "wlora-four",
        "wlora-once",
        "wlora-once-norm",
        "wlora-lm-head",
        "wlora-plus",
        "random",
        "habit-mlp",
    ):
        assert by[m].kept == task_k, (m, by[m])
    assert by["wlora-authors"].kept == task_k  # of n + 1 candidates (lm_head included)
    assert by["lora-all"].kept == by["lora-all-equal"].kept == 14
    assert by["lora-all"].trainable == 4 * by["lora-all-equal"].trainable  # rank 4 vs 1
    assert by["wlora"].selection_seconds > 0 and by["random"].selection_seconds == 0
    for r in results:
        assert 0 < r.eval_loss < 20 and 0 <= r.accuracy <= 1, r
    # Every fine-tuned run moved the model off the pretrained one's held-out loss.
    assert all(r.eval_loss != by["no fine-tuning"].eval_loss for r in results if r.method != "no fine-tuning")
    saved = json.loads((tmp_path / "out/chance.json").read_text())
    assert len(saved["runs"]) == len(results) and len(saved["rows"]) == len(rows)
    assert len((tmp_path / "out/partial.jsonl").read_text().splitlines()) == len(chance.METHODS)
    assert (tmp_path / "out/chance.png").stat().st_size > 10_000
    assert "| wlora |" in text and "| random |" in text
    # The pretrained model is cached: a second look reuses it (same folder, not retrained).
    assert len(list((tmp_path / "cache").glob("pretrained-*"))) == 1


def test_the_wide_study_in_miniature():
    shapes = [Shape(2, 2, 1, "equal"), Shape(4, 2, 4, "spread")]
    res = wide_study(1, ["once at T", "once at T + layer_quota"], steps=4, shapes=shapes)
    for cand in res["candidates"].values():
        assert set(cand["families"]) == {"depth 2", "depth 4", "K 2", "delta rank 1", "delta rank 4",
                                         "sizes equal", "sizes spread"}  # fmt: skip
        assert all(0 <= v <= 1 for v in cand["families"].values())
        assert cand["worst_shape"][0] in {s.name for s in shapes}
    assert "| once at T |" in wide_markdown(res)


def test_layer_quota_keeps_at_most_the_quota_of_a_layer():
    w = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    layers = [0, 0, 0, 1, 1, 1]
    kept = _quota_topk(w, layers, k=3, quota=2)
    assert torch.equal(kept, torch.tensor([5.0, 4.0, 0.0, 2.0, 0.0, 0.0]))


def test_adapter_norm_correction_divides_by_each_adapters_scale():
    from wlora_dist.config import AdapterConfig
    from wlora_dist.method.weight_lora import WeightLoRA
    from wlora_dist.model.tiny import make_model

    wl = WeightLoRA.attach(make_model(259, hidden=16, layers=1), AdapterConfig(lora_rank=2))
    norms = []
    for i, site in enumerate(wl.sites):
        a, b = wl.adapter_params(site)
        with torch.no_grad():
            b.fill_(0.1 * (i + 1))
        norms.append(float(torch.linalg.matrix_norm(b @ a)))
    grad = torch.ones(wl.n)
    out = _corrected(wl, grad, "adapter_norm")
    expected = torch.tensor(norms).mean() / torch.tensor(norms)
    assert torch.allclose(out, expected, rtol=1e-4)
    assert torch.equal(_corrected(wl, grad, "none"), grad)
