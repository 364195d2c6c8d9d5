"""Telling a local path from a hub id, so a missing local path is an error, not a download."""

from __future__ import annotations

import os
from pathlib import Path

KNOWN_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".txt", ".safetensors", ".yaml", ".yml"}


def looks_local(source: str) -> bool:
    """True for anything that is, or is written like, a path on disk."""
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or Path(source).suffix.lower() in KNOWN_SUFFIXES
        or os.path.exists(os.path.expanduser(source))
        or source.count("/") > 1  # hub ids are "name" or "org/name"
    )


def default_data_cache() -> Path:
    """Where tokenised data goes when data.cache_dir is empty: one copy per dataset (the
    key covers the rows' fingerprints, the tokenizer and the data settings), shared by
    every run and output folder. $WLORA_DATA_CACHE, else $XDG_CACHE_HOME/wlora_dist/data,
    else ~/.cache/wlora_dist/data."""
    if os.environ.get("WLORA_DATA_CACHE"):
        return Path(os.path.expanduser(os.environ["WLORA_DATA_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wlora_dist" / "data"
