"""Shared fixtures (a tiny Llama made in-process, the embedded default on disk) and the
test tiers.

Tiers by scope, widest wins (README, "Development"):

- ``unit`` (every test not marked otherwise): this process only, no model trained, no
  process started; `make test-fast` runs these, in seconds.
- ``inprocess``: builds and trains a model in this process (a Trainer, the CLI's main).
- ``launched``: starts processes (torchrun workers, the CLI, the launchers); every ``dist``
  and ``e2e`` test is one.

A guard holds each test to its tier: a unit test that sets up a Trainer, or a test below
``launched`` that starts a Python process, fails naming the marker it needs, so the fast
tier cannot quietly grow training runs again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The shared tokenised-data cache (paths.default_data_cache): one per test session, not ~/.cache.
os.environ.setdefault("WLORA_DATA_CACHE", tempfile.mkdtemp(prefix="wlora-data-cache-"))

from wlora_dist.model.tiny import make_model, make_tokenizer, write_default  # noqa: E402
from wlora_dist.training.trainer import Trainer  # noqa: E402

TIERS = ("unit", "inprocess", "launched")  # narrowest first
_running: list[str] = []  # the tier of the test being set up, run or torn down


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("dist") or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.launched)
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


def _tier(item: pytest.Item) -> str:
    return max((t for t in TIERS if item.get_closest_marker(t)), key=TIERS.index)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Module- and session-scoped fixtures run while their first user is set up: what they
    # train counts against that test's tier.
    _running[:] = [_tier(item)]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _running.clear()


def _require(tier: str, what: str) -> None:
    if _running and TIERS.index(_running[0]) < TIERS.index(tier):
        pytest.fail(f"this test {what}: mark it @pytest.mark.{tier} (tests/conftest.py, tiers)", pytrace=False)


def _guard(fn: Callable, tier: str, what: str, applies: Callable[..., bool] = lambda *a, **k: True) -> Callable:
    def guarded(*args, **kwargs):
        if applies(*args, **kwargs):
            _require(tier, what)
        return fn(*args, **kwargs)

    return guarded


def _starts_python(self: subprocess.Popen, args=None, *rest, **kwargs) -> bool:
    args = kwargs.get("args", args)
    argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args or [])
    head = Path(str(argv[0]).split()[0]).name if argv and str(argv[0]).strip() else ""
    return head.startswith("python") or head in {"torchrun", "accelerate", "deepspeed", "wlora-dist", "srun", "sbatch"}


Trainer.setup = _guard(Trainer.setup, "inprocess", "sets up a Trainer (a model trained in this process)")
subprocess.Popen.__init__ = _guard(subprocess.Popen.__init__, "launched", "starts a process", _starts_python)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/tiny-like folder: model/ (2 layers, 14 adapters) and data/{train,eval}.jsonl."""
    out = tmp_path_factory.mktemp("tiny")
    return write_default(out, rows=400, hidden=32, layers=2, seed=0)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return make_model(len(make_tokenizer()), hidden=32, layers=2, seed=0)


def tiny_config_dict(tiny_dir: Path, out_dir: Path, **sections) -> dict:
    """A small, fast run config over ``tiny_dir``; ``sections`` update its sections."""
    cfg = {
        "model": {"path": str(tiny_dir / "model")},
        "adapter": {"lora_rank": 4, "lora_alpha": 8},
        "selection": {"method": "topk", "k": 4, "lr_w": 5.0, "steps": 4, "project_every": 1},
        "optim": {"lr": 5e-3, "warmup_steps": 2},
        "data": {
            "train": [str(tiny_dir / "data/train.jsonl")],
            "eval": [str(tiny_dir / "data/eval.jsonl")],
            "seq_len": 64,
        },
        "train": {"max_steps": 8, "micro_batch_size": 4, "eval_batches": 2},
        "log": {"every": 1, "progress_bar": False, "trackers": ["jsonl"]},
        "output": {"dir": str(out_dir)},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
