"""Data: local files, saved dataset folders or hub ids through HF ``datasets``, tokenised
into one of three formats, and sharded so each data-parallel rank reads its own rows.

- text:        causal LM, rows joined with EOS and packed into seq_len blocks
- instruction: prompt + response (through the chat template as a user / assistant turn
               when the tokenizer has one, data.template), loss only on the response tokens
- chat:        a list of {role, content} messages through the tokenizer's chat template,
               loss only on the assistant turns

data.packing puts several instruction / chat rows in one seq_len row without attention
across them; tokenise_once has rank 0 tokenise for every rank (data.cache_dir).
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from wlora_dist.config import DataConfig
from wlora_dist.data import cache as data_cache
from wlora_dist.errors import UserError
from wlora_dist.paths import looks_local

log = logging.getLogger("wlora_dist")

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
    parts = []
    for k, source in enumerate(sources):
        part = _load_one(source, split)
        part = part.add_column(SOURCE, [k] * len(part)).add_column(ROW, list(range(len(part))))
        parts.append(part)
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


def tokenize(
    ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig, sources: list[str] | None = None
) -> datasets.Dataset:
    """Rows -> {input_ids, labels} lists, per cfg.format. ``sources``: the list ``ds`` was
    loaded from (load_rows), so errors name the file and its row."""
    fn = {"text": _pack_text, "instruction": _instruction, "chat": _chat}[cfg.format]
    fields = {"text": ["text_field"], "instruction": ["prompt_field", "response_field"], "chat": ["messages_field"]}
    _require_columns(ds, [getattr(cfg, f) for f in fields[cfg.format]], fields[cfg.format])
    out = ds.map(
        lambda batch, idx: fn(batch, _row_names(batch, idx, sources), tokenizer, cfg),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        desc=f"tokenising ({cfg.format})",
    )
    if len(out) == 0:
        raise DataError(f"no training rows after tokenising: fewer than data.seq_len={cfg.seq_len} tokens in all")
    if cfg.packing and cfg.format != "text":
        out = pack_rows(out, cfg.seq_len)
    return out


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _pack_text(batch: dict, rows: list[str], tokenizer: Any, cfg: DataConfig) -> dict:
    texts = batch[cfg.text_field]
    for where, t in zip(rows, texts, strict=True):
        if not isinstance(t, str):
            raise DataError(f"{where}: data.text_field {cfg.text_field!r} is {type(t).__name__}, not text")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + _eos(tokenizer)
    n = len(stream) // cfg.seq_len
    blocks = [stream[i * cfg.seq_len : (i + 1) * cfg.seq_len] for i in range(n)]
    # Remainder tokens of a batch are dropped (at most seq_len - 1 per 1000 rows).
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def _fit(ids: list[int], labels: list[int], row: str, cfg: DataConfig) -> tuple[list[int], list[int]]:
    if len(ids) > cfg.seq_len:
        if not cfg.truncate:
            raise DataError(
                f"{row}: {len(ids)} tokens > data.seq_len={cfg.seq_len}; raise seq_len or set data.truncate=true"
            )
        ids, labels = ids[: cfg.seq_len], labels[: cfg.seq_len]
    return ids, labels


def instruction_template(tokenizer: Any, cfg: DataConfig) -> str:
    """'chat' or 'plain': what data.template means for this tokenizer."""
    if cfg.template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) is not None else "plain"
    return cfg.template


def _instruction(batch: dict, rows: list[str], tokenizer: Any, cfg: DataConfig) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    chat = instruction_template(tokenizer, cfg) == "chat"
    if chat:
        require_chat_template(tokenizer, fmt="instruction")
    for i, prompt, response in zip(rows, batch[cfg.prompt_field], batch[cfg.response_field], strict=True):
        if not isinstance(prompt, str) or not isinstance(response, str):
            kinds = f"{type(prompt).__name__}/{type(response).__name__}"
            raise DataError(
                f"{i}: data.prompt_field / data.response_field must be text, got {kinds}; fix or drop that row"
            )
        if chat:  # the prompt is the user turn, the response the assistant turn
            ids, labels = _chat_row(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenizer
            )
        else:
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            r = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
            ids, labels = p + r, [IGNORE] * len(p) + r
        ids, labels = _fit(ids, labels, i, cfg)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def _template(tokenizer: Any, messages: list[dict], gen: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
    return list(ids)


def require_chat_template(tokenizer: Any, model_path: str | None = None, fmt: str = "chat") -> None:
    """data.format=chat (or instruction with data.template=chat) renders rows through the
    tokenizer's chat template: refuse one without."""
    if getattr(tokenizer, "chat_template", None) is None:
        whose = f"the one in model.path={model_path!r}" if model_path else "this model's"
        what, instead = (
            ("data.format=chat", "data.format=instruction / text")
            if fmt == "chat"
            else ("data.template=chat", "data.template=plain or auto")
        )
        raise DataError(
            f"{what} needs a tokenizer with a chat template; {whose} has none (use the instruct model's folder, "
            f"or {instead})"
        )


def _chat(batch: dict, rows: list[str], tokenizer: Any, cfg: DataConfig) -> dict:
    require_chat_template(tokenizer)
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for i, messages in zip(rows, batch[cfg.messages_field], strict=True):
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataError(f"{i}: {cfg.messages_field!r} must be a list of {{role, content}} messages")
        ids, labels = _fit(*_chat_row(messages, tokenizer), i, cfg)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def _chat_row(messages: list[dict], tokenizer: Any) -> tuple[list[int], list[int]]:
    """A conversation's tokens, labelled on the assistant turns only."""
    ids = _template(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for t, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The assistant turn is what the template adds between the prompt for turn t and
        # the conversation up to turn t (templates render prefixes consistently).
        start = len(_template(tokenizer, messages[:t], gen=True))
        end = len(_template(tokenizer, messages[: t + 1]))
        labels[start:end] = ids[start:end]
    return ids, labels


def pack_rows(ds: datasets.Dataset, seq_len: int) -> datasets.Dataset:
    """Instruction / chat rows packed in order into rows of at most ``seq_len`` tokens, each
    with ``position_ids`` restarting at 0 where a source row starts. transformers reads the
    restarts as sequence boundaries when no attention mask is given (masking_utils'
    find_packed_sequence_indices: sdpa / eager get a block-diagonal causal mask, flash
    attention its cu_seqlens), so no token attends to another row's. The first label of
    each row is IGNORE: unpacked, the shifted loss never predicts a row's first token; packed,
    it would be predicted from the previous row's last."""

    def pack(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        cur: dict[str, list] = {k: [] for k in out}
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > seq_len:
                for k in out:
                    out[k].append(cur[k])
                cur = {k: [] for k in out}
            cur["input_ids"] += ids
            cur["labels"] += [IGNORE, *labels[1:]]
            cur["position_ids"] += range(len(ids))
        if cur["input_ids"]:
            for k in out:
                out[k].append(cur[k])
        return out

    return ds.map(pack, batched=True, remove_columns=ds.column_names, desc="packing")


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens of a collated batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["num_tokens"])


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a collated batch the model's forward takes."""
    return {k: v for k, v in batch.items() if k != "num_tokens"}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding has attention 0 and label IGNORE. Packed rows
    (with position_ids) get no attention mask, which would hide their boundaries from
    transformers: their padding is one more sequence (positions from 0), attended by
    nothing before it, and ``num_tokens`` counts the real tokens."""
    width = max(len(r["input_ids"]) for r in rows)
    if "position_ids" in rows[0]:
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        pos = torch.arange(width).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] -= n
        n_real = sum(len(r["input_ids"]) for r in rows)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "num_tokens": torch.tensor(n_real)}
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}  # each (B, T)


def make_loader(
    ds: datasets.Dataset, batch_size: int, pad_id: int, rank: int, world_size: int, seed: int, shuffle: bool
) -> DataLoader:
    """One rank's shard of ``ds``: DistributedSampler gives every rank disjoint rows."""
    if len(ds) < world_size * batch_size:
        raise DataError(
            f"{len(ds)} rows cannot fill one micro-batch of {batch_size} on each of {world_size} ranks; "
            "add data, lower data.seq_len or train.micro_batch_size"
        )
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=lambda rows: collate(rows, pad_id),
        # Its own generator: starting an epoch's iterator draws a seed from the loader's
        # generator, which without one is torch's global RNG, the dropout stream; a resumed
        # run starts its iterator at another point of that stream and would not be bitwise.
        generator=torch.Generator().manual_seed(seed),
    )


def forever(loader: DataLoader, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Cycle through epochs; each epoch reshuffles deterministically (sampler.set_epoch).
    ``start``: micro-batches already consumed (a resumed run); they are skipped by index,
    without reading or collating their rows."""
    epoch, skip = divmod(start, len(loader))
    while True:
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        if skip:
            indices = list(loader.sampler)[skip * loader.batch_size :]  # type: ignore[operator]
            rest = DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                sampler=indices,
                drop_last=True,
                collate_fn=loader.collate_fn,
                generator=loader.generator,
            )
            yield from rest
            skip = 0
        else:
            yield from loader
        epoch += 1


def train_eval_split(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Raw train rows and eval rows (given, or split off before packing so nothing leaks)."""
    train = load_rows(cfg.train, cfg.split)
    if cfg.eval:
        return train, load_rows(cfg.eval, cfg.split)
    if cfg.eval_fraction <= 0 or len(train) < 2:
        return train, None
    parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _tokenise_pair(
    cfg: DataConfig, tokenizer: Any, train_rows: datasets.Dataset, eval_rows: datasets.Dataset | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    train = tokenize(train_rows, tokenizer, cfg, cfg.train)
    return train, None if eval_rows is None else tokenize(eval_rows, tokenizer, cfg, cfg.eval or cfg.train)


def tokenise_once(
    cfg: DataConfig, seed: int, tokenizer: Any, cache_root: Path, rank: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Collective. Rank 0 reads and tokenises (or finds the cache of an earlier run) and
    saves the result under ``cache_root``; the other ranks load that copy. A rank that
    cannot see it (a node-local cache_dir on another node) tokenises for itself."""
    # Imported here: data.pipeline stays importable without torch.distributed set up.
    from wlora_dist.distributed.env import gather_objects

    status: dict[str, str] = {}
    if rank == 0:
        try:
            train_rows, eval_rows = train_eval_split(cfg, seed)
            path = cache_root / data_cache.cache_key(cfg, seed, tokenizer, train_rows, eval_rows)
            found = data_cache.load(path)
            if found is not None:
                log.info("tokenised data: reusing %s", path)
                train, eval_ds = found
            else:
                train, eval_ds = _tokenise_pair(cfg, tokenizer, train_rows, eval_rows)
                if data_cache.save(path, train, eval_ds):
                    log.info("tokenised data: %d train / %s eval rows saved in %s", len(train), _n(eval_ds), path)
                    train, eval_ds = data_cache.load(path) or (train, eval_ds)  # memory-mapped, as other ranks
            status = {"path": str(path)} if (path / "DONE").is_file() else {}
        except UserError as e:
            status = {"error": str(e), "kind": type(e).__name__}
            gather_objects(status)
            raise
    first = gather_objects(status)[0]
    if "error" in first:
        raise DataError(f"(found by rank 0) {first['error']}")
    if rank == 0:
        return train, eval_ds
    found = data_cache.load(Path(first["path"])) if "path" in first else None
    if found is None:
        if "path" in first:
            log.warning(
                "rank %d cannot see rank 0's tokenised data at %s; tokenising here too (put data.cache_dir on a "
                "folder every node sees to avoid it)",
                rank,
                first["path"],
            )
        found = _tokenise_pair(cfg, tokenizer, *train_eval_split(cfg, seed))
    return found


def _n(ds: datasets.Dataset | None) -> str:
    return "no" if ds is None else str(len(ds))


def build_loaders(
    cfg: DataConfig, micro_batch: int, seed: int, tokenizer, rank: int, world_size: int, cache_root: Path
) -> tuple[DataLoader, DataLoader | None]:
    """This rank's training loader and its eval loader (None without eval data, or with
    fewer eval rows than one micro-batch per rank). Collective: see tokenise_once."""
    train_ds, eval_ds = tokenise_once(cfg, seed, tokenizer, cache_root, rank)
    pad = tokenizer.pad_token_id
    train = make_loader(train_ds, micro_batch, pad, rank, world_size, seed, True)
    if eval_ds is None:
        return train, None
    if len(eval_ds) < world_size * micro_batch:
        log.warning("eval data has %d rows, fewer than one batch per rank: no eval", len(eval_ds))
        return train, None
    return train, make_loader(eval_ds, micro_batch, pad, rank, world_size, 0, False)
