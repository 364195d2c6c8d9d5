"""Shared fixtures: a tiny Llama made in-process and the embedded default on disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from wlora_dist.model.tiny import make_model, make_tokenizer, write_default  # noqa: E402


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
