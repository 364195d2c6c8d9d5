"""Telling a local path from a hub id, so a missing local path is an error, not a download;
and what is wrong with a local model folder or data file, found with the file system alone
(train says it before importing torch: seconds, not a minute, on a loaded machine)."""

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


def local_model_problem(path: str) -> str | None:
    """What makes local folder ``path`` no HF model folder to train (None: nothing, or not local)."""
    if not looks_local(path):
        return None
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        return f"model.path={path!r}: no such folder; give an HF model folder (with config.json) or a hub id"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return f"model.path={path!r}: folder has no config.json; is it an HF model folder?"
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(folder)):
        pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        return (
            f"model.path={path!r}: no safetensors weights"
            + (f" (found {', '.join(pickled)}: pickled files can run code and are never loaded)" if pickled else "")
            + "; convert once with transformers: AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder, safe_serialization=True)"
        )
    return None


def missing_data_file(train: list[str], eval_: list[str]) -> str | None:
    """The first local data file of data.train / data.eval that does not exist (a message)."""
    for field, sources in (("data.train", train), ("data.eval", eval_)):
        for source in sources:
            if looks_local(source) and not os.path.exists(os.path.expanduser(source)):
                return f"data file {source} does not exist; fix the path in {field}"
    return None
