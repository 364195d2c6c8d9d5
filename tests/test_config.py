"""Config: every shipped YAML loads; every problem is reported at once with field and fix."""

import sys
from pathlib import Path

import pytest

from wlora_dist.config import ConfigError, RunConfig, config_from_dict, describe, load_config

from .helpers import run_command

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"path": "m"}, "data": {"train": ["d.jsonl"]}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.model.path and cfg.data.train


def test_overrides_are_typed_and_dotted():
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        ["train.max_steps=77", "selection.k=3", "optim.lr=1e-4", "adapter.target_modules=[q_proj,v_proj]"],
    )
    assert cfg.train.max_steps == 77 and cfg.selection.k == 3
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_all_problems_reported_at_once():
    bad = {
        "model": {"path": "m", "dtype": "fp8"},
        "selection": {"k": 0, "lr_w": -1.0, "methd": "topk"},
        "optim": {"lr": -0.1, "betas": [0.9]},
        "train": {"max_steps": "ten"},
        "data": {"train": ["d.jsonl"]},
        "bogus": {},
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad)
    text = str(info.value)
    # Wrong types, unknown fields and out-of-range values, all in one pass.
    ranges = [
        "selection.k: 0 must be >= 1",
        "selection.lr_w: -1.0 must be >= 0",
        "optim.lr: -0.1 must be >= 0",
        "optim.betas: [0.9] must be two numbers",
    ]
    for needle in [
        "model.dtype: got 'fp8'",
        "selection.methd: unknown field; did you mean 'method'",
        "train.max_steps: got 'ten', expected int",
        "bogus: unknown field",
        *ranges,
    ]:
        assert needle in text, text
    bad["model"]["dtype"] = "auto"
    del bad["selection"]["methd"], bad["bogus"]
    bad["train"]["max_steps"] = 10
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad)
    text = str(info.value)
    for needle in ranges:
        assert needle in text, text
    assert len(info.value.problems) == 4


def test_selection_longer_than_run_is_rejected():
    with pytest.raises(ConfigError, match=r"selection.steps: 50 exceeds train.max_steps=20"):
        config_from_dict({**MINIMAL, "selection": {"steps": 50}, "train": {"max_steps": 20}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(ROOT / "configs/tiny_cpu.yaml", ["train.max_steps"])


def test_describe_documents_every_field():
    lines = describe()
    assert any(line.strip().startswith("selection.k (int or float, default 0.25):") for line in lines)
    assert all(line.rstrip().endswith(":") or ": " in line for line in lines)


@pytest.mark.launched
def test_cli_bad_config_exits_2_with_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: m}\ndata: {train: [x.jsonl]}\nselection: {k: -3}\n")
    proc = run_command([sys.executable, str(ROOT / "train.py"), "--config", str(bad)], timeout=120)
    assert proc.returncode == 2
    assert "selection.k: -3 must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def _base(**sections):
    data = {"model": {"path": "m"}, "data": {"train": ["t.jsonl"]}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return data


def test_epochs_and_fractions_become_step_counts_from_the_data():
    """A resolved run sized from its data: a new frozen config, the loaded one unchanged."""
    from wlora_dist.resolved import resolve_run

    cfg = config_from_dict(_base(train={"epochs": 2.5}, selection={"steps_fraction": 0.2}, optim={"warmup_ratio": 0.1}))
    run = resolve_run(cfg)
    assert not run.sized
    sized = run.sized_by(steps_per_epoch=13)
    c = sized.cfg
    assert sized.sized and (c.train.max_steps, c.selection.steps, c.optim.warmup_steps) == (33, 7, 3)  # ceil(32.5)
    assert (cfg.train.epochs, cfg.train.max_steps) == (2.5, 100)  # the loaded config: as loaded
    with pytest.raises(Exception, match="frozen"):
        cfg.train.max_steps = 5  # type: ignore[misc]
    plus = config_from_dict(_base(train={"epochs": 1}, selection={"steps_fraction": 0.3, "rounds": 2}))
    assert resolve_run(plus).sized_by(steps_per_epoch=20).cfg.selection.steps == 6  # a multiple of the rounds
    short = config_from_dict(_base(train={"epochs": 1}, selection={"steps": 50}))
    with pytest.raises(ConfigError, match=r"selection\.steps: 50 exceeds train\.max_steps=10"):
        resolve_run(short).sized_by(steps_per_epoch=10)


def test_a_ratio_and_the_count_it_replaces_are_not_both_set():
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            _base(
                train={"epochs": 2, "max_steps": 100},
                selection={"steps_fraction": 0.1, "steps": 5},
                optim={"warmup_ratio": 1.5},
            )
        )
    msg = str(e.value)
    assert "train.epochs: 2 and train.max_steps: 100 both set; keep one of the two" in msg
    assert "selection.steps_fraction: 0.1 and selection.steps: 5 both set" in msg
    assert "optim.warmup_ratio: 1.5 must be in [0, 1)" in msg


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (0, "selection.k: 0 must be >= 1 (number of adapters kept; or a share of them in (0, 1), e.g. 0.25)"),
        (1.0, "selection.k: 1.0 as a float is a share of the n adapters and must be in (0, 1), e.g. 0.25; an int "
              "counts them (write 1 to keep 1)"),
        (1.5, "selection.k: 1.5 as a float is a share of the n adapters and must be in (0, 1), e.g. 0.25"),
        (-0.25, "selection.k: -0.25 as a float is a share"),
        (True, "selection.k: True is neither a number of adapters (an int, e.g. 8) nor a share of them"),
        ("eight", "selection.k: 'eight' is neither a number of adapters"),
    ],
)  # fmt: skip
def test_selection_k_is_a_count_or_a_share_and_says_which_it_got(value, said):
    with pytest.raises(ConfigError) as e:
        config_from_dict({**MINIMAL, "selection": {"k": value}})
    about_k = [p for p in e.value.problems if p.startswith("selection.k")]
    assert len(about_k) == 1 and about_k[0].startswith(said)  # one message, whatever is wrong


def test_a_share_of_n_becomes_a_count_on_the_model():
    from wlora_dist.config.selection import kept_count

    for k, n, count in [(0.25, 210, 52), (0.25, 224, 56), (0.25, 14, 4), (0.01, 28, 1), (0.5, 3, 2), (8, 210, 8)]:
        assert kept_count(k, n) == count, (k, n)
    cfg = config_from_dict({**MINIMAL, "selection": {"k": "1e-1"}})  # YAML reads 1e-1 as a string
    assert cfg.selection.k == 0.1 and cfg.selection.kept(210) == 21
    assert config_from_dict(MINIMAL).selection.kept(224) == 56  # the default: a quarter of n
