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
