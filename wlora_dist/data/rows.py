"""Rows: local files (json, jsonl, csv, parquet, txt), saved dataset folders or hub ids
through HF ``datasets``; each row keeps where it came from (file, row) so an error names
the file's own row. Errors a user can fix are DataError: which file, column or row, and
what to do."""

from __future__ import annotations

import codecs
import os
from pathlib import Path

import datasets

from wlora_dist.errors import UserError
from wlora_dist.paths import looks_local

IGNORE = -100  # label of tokens that carry no loss (transformers' convention)
_EXT_BUILDER = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataError(UserError):
    """A problem with the user's data: says which file / column / row and what to do."""


# Where each row came from (index into the sources, row in that source), carried through
# the train/eval split's shuffle so an error names the file's row, not the split's index.
SOURCE, ROW = "__wlora_source", "__wlora_row"


def load_rows(sources: list[str], split: str = "train") -> datasets.Dataset:
    """Read every source (file, saved dataset folder or hub id) into one Dataset, each row
    tagged with its source and its row number there (0-based)."""
    return concat_rows(load_parts(sources, split), sources)


def load_parts(sources: list[str], split: str = "train") -> list[datasets.Dataset]:
    """Each source read on its own, its rows tagged with (source, row)."""
    parts = []
    for k, source in enumerate(sources):
        part = _load_one(source, split)
        parts.append(part.add_column(SOURCE, [k] * len(part)).add_column(ROW, list(range(len(part)))))
    return parts


def concat_rows(parts: list[datasets.Dataset], sources: list[str]) -> datasets.Dataset:
    """The parts as one Dataset; none at all is an error naming the sources."""
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        raise DataError(f"data {sources}: no rows; check the files are not empty")
    return ds


def _load_one(source: str, split: str) -> datasets.Dataset:
    path = Path(os.path.expanduser(source))
    if not looks_local(source):
        return datasets.load_dataset(source, split=split)  # a hub id (needs internet)
    if not path.exists():
        raise DataError(f"data file {source} does not exist; fix the path in data.train / data.eval")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{source}: a folder, but not one saved by datasets.save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: no split {split!r} (has {list(loaded)}); set data.split")
            loaded = loaded[split]
        return loaded
    builder = _EXT_BUILDER.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{source}: unknown file type {path.suffix!r}; use one of {sorted(_EXT_BUILDER)}")
    if builder != "parquet":
        _check_utf8(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several types
        cause = e.__cause__ or e
        raise DataError(f"{source}: could not be read as {builder}: {cause}") from None


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Reject invalid UTF-8 up front: pyarrow's JSON reader would load it silently."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                at = offset + e.start
                line += block[: e.start].count(b"\n")
                raise DataError(
                    f"{path}: not valid UTF-8 at byte {at} (line {line}); re-encode the file as UTF-8"
                ) from None
            offset += len(block)
            line += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: ends inside a UTF-8 character; the file is truncated or not UTF-8") from None


def _require_columns(ds: datasets.Dataset, needed: list[str], cfg_fields: list[str]) -> None:
    for column, field in zip(needed, cfg_fields, strict=True):
        if column not in ds.column_names:
            raise DataError(
                f"column {column!r} (data.{field}) not in the data; its columns are "
                f"{[c for c in ds.column_names if c not in (SOURCE, ROW)]}. "
                f"Set data.{field} to one of them or change data.format"
            )


def _row_names(batch: dict, idx: list[int], sources: list[str] | None) -> list[str]:
    """'train.parquet row 17' for each row of ``batch`` (the file's row, 0-based)."""
    if sources is None or ROW not in batch:
        return [f"row {i}" for i in idx]
    return [f"{sources[k]} row {r}" for k, r in zip(batch[SOURCE], batch[ROW], strict=True)]


def first_rows(source: str, n: int) -> list[dict] | None:
    """The first ``n`` rows of a local file or saved dataset, read cheaply (None: a kind
    read only when training loads it)."""
    import json

    path = os.path.expanduser(source)
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{source}: a folder, but not one saved by datasets.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = next(iter(ds.values()))
        return ds.select(range(min(n, len(ds)))).to_list()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        return pf.read_row_group(0).slice(0, n).to_pylist() if pf.num_row_groups else []
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
        if head.lstrip().startswith("["):
            return None  # a JSON array: parsed whole when training loads it
        rows = []
        for line in head.splitlines()[: n + 1]:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # the 64 KiB cut a long line; what was read is enough
        return rows[:n]
    if suffix == ".csv":
        import csv

        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            return [row for _, row in zip(range(n), csv.DictReader(f), strict=False)]
    if suffix == ".txt":
        with open(path, encoding="utf-8", errors="replace") as f:
            return [{"text": line.rstrip("\n")} for _, line in zip(range(n), f, strict=False)]
    return None
