"""`wlora-dist generate`: an adapter (or a model folder) completes prompts, greedy by default."""

import json

import pytest

from wlora_dist.cli import main

from .helpers import train_in_process


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    _, result = train_in_process(
        tiny_dir, tmp_path_factory.mktemp("gen"), train={"max_steps": 3}, selection={"steps": 2, "k": 3}
    )
    return result.adapter_dir


def _generate(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["generate", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.inprocess
def test_greedy_generation_from_an_adapter_is_repeatable(adapter, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ada has 3 apples"}) + "\n" + json.dumps({"prompt": "bob"}) + "\n")
    args = [str(adapter), "--prompt", "cy gives", "--prompts-file", str(prompts), "--max-new-tokens", "6", "--json"]
    rc, first, _ = _generate(capsys, *args)
    assert rc == 0
    rows = [json.loads(line) for line in first.splitlines()]
    assert [r["prompt"] for r in rows] == ["cy gives", "ada has 3 apples", "bob"]
    rc, second, _ = _generate(capsys, *args)
    assert rc == 0 and second == first  # greedy: the same completions


def test_a_model_folder_and_plain_prompts(tiny_dir, capsys):
    rc, out, _ = _generate(
        capsys, str(tiny_dir / "model"), "--prompt", "hi", "--no-chat-template", "--max-new-tokens", "3"
    )
    assert rc == 0 and out.startswith("### prompt\nhi\n### completion\n")


@pytest.mark.inprocess
def test_bad_input_is_one_message(adapter, tmp_path, capsys):
    rc, _, err = _generate(capsys, str(adapter))
    assert rc == 1 and "give a prompt" in err
    rc, _, err = _generate(capsys, str(tmp_path / "nope"), "--prompt", "x")
    assert rc == 1 and "no such folder" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    rc, _, err = _generate(capsys, str(adapter), "--prompts-file", str(bad))
    assert rc == 1 and "bad.jsonl line 1" in err
