"""Tokenise once: rank 0 reads and tokenises the data and saves the result with ``datasets``
(Arrow files) under data.cache_dir; every other rank memory-maps that copy instead of
tokenising the whole dataset itself, and a rerun or a resumed run with the same data,
tokenizer and data settings reuses it.

The key is datasets' own fingerprint of the raw rows (it follows the files' paths and
modification times, a saved dataset's state, a hub dataset's revision), the tokenizer's
full serialisation and chat template, and every data.* setting that changes the tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from wlora_dist.config import DataConfig

log = logging.getLogger("wlora_dist")

# Bump when what tokenize() writes for the same inputs changes: old caches are then unused.
# 3: no second space before a response that starts with one (TRL completions); 4: rows with
# nothing to train on dropped (data.max_untrained_share)
FORMAT_VERSION = 4
_NOT_TOKENS = ("train", "eval", "cache_dir")  # data.* fields the rows' fingerprints already cover, or paths


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that decides the tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode()).hexdigest()


def cache_key(
    cfg: DataConfig, seed: int, tokenizer: Any, train_rows: datasets.Dataset, eval_rows: datasets.Dataset | None
) -> str:
    settings = {k: v for k, v in cfg.model_dump().items() if k not in _NOT_TOKENS}
    ident = {
        "version": FORMAT_VERSION,
        "settings": settings,
        "seed": seed,
        "train": train_rows._fingerprint,
        "eval": None if eval_rows is None else eval_rows._fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No 'Saving the dataset' / 'Loading dataset from disk' bars: a copy, not progress."""
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def load(path: Path) -> tuple[datasets.Dataset, datasets.Dataset | None] | None:
    """The tokenised train / eval sets saved at ``path``, or None when there is no
    complete copy there (missing, or not visible from this node)."""
    if not (path / "DONE").is_file():
        return None
    with _quiet():
        train = datasets.load_from_disk(str(path / "train"))
        eval_ds = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    return train, eval_ds


def save(path: Path, train: datasets.Dataset, eval_ds: datasets.Dataset | None) -> bool:
    """Write the pair next to ``path`` and move it into place in one rename, so a crash
    mid-write or a full disk leaves no half copy under the key (only a ``.partial-``
    folder, removed on the next attempt). False (and a warning) when it could not be
    written: training goes on from memory, every rank tokenising for itself."""
    partial = path.with_name(f".partial-{path.name}-{os.getpid()}")
    for old in path.parent.glob(f".partial-{path.name}-*"):
        shutil.rmtree(old, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        with _quiet():
            train.save_to_disk(str(partial / "train"))
            if eval_ds is not None:
                eval_ds.save_to_disk(str(partial / "eval"))
        (partial / "DONE").write_text("complete\n")
        os.replace(partial, path)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if (path / "DONE").is_file():  # another run wrote the same key first
            return True
        log.warning("could not write the tokenised data to %s (%s); every rank tokenises for itself", path, e)
        return False
    return True
