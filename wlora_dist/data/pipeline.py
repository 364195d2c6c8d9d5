"""Data to batches: rows (rows.py) tokenised (tokens.py) once, by rank 0 for every rank
(tokenise_once, data.cache_dir), split into train and eval, and served so each
data-parallel rank reads its own rows, from the data position a resume gives."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from wlora_dist.config import DataConfig
from wlora_dist.data import cache as data_cache
from wlora_dist.data.rows import IGNORE, DataError
from wlora_dist.data.tokens import tokenize
from wlora_dist.errors import UserError

log = logging.getLogger("wlora_dist")


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens of a collated batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["num_tokens"])


def count_trained(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss predicts (a label, shifted: the first position never is)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


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


def fill_problem(rows: int, micro_batch: int, world_size: int, split: str = "data.train") -> str | None:
    """Why ``rows`` tokenised rows cannot feed one micro-batch to every rank, or None."""
    if rows >= world_size * micro_batch:
        return None
    return (
        f"{split}: {rows} rows after tokenising cannot fill one micro-batch of {micro_batch} on each of "
        f"{world_size} ranks; add data, lower data.seq_len or train.micro_batch_size"
    )


def eval_micro_batch(rows: int, micro_batch: int, world_size: int, given: bool) -> int:
    """The eval micro-batch: train.micro_batch_size, or fewer rows where the eval data has
    fewer than one such batch per rank (it used to switch eval off without a word).
    ``given``: data.eval named the rows (else data.eval_fraction split them off)."""
    if rows < world_size:
        fix = "add rows to data.eval" if given else "raise data.eval_fraction"
        raise DataError(
            f"eval data: {rows} rows after tokenising, fewer than the {world_size} ranks that each evaluate one: "
            f"{fix}, or set data.eval_fraction=0 and data.eval=[] for no eval"
        )
    return min(micro_batch, rows // world_size)


def steps_per_epoch(rows: int, micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``rows`` (DistributedSampler and the loader drop
    what does not fill a batch on every rank)."""
    return (rows // world_size // micro_batch) // grad_accum


def make_loader(
    ds: datasets.Dataset, batch_size: int, pad_id: int, rank: int, world_size: int, seed: int, shuffle: bool
) -> DataLoader:
    """One rank's shard of ``ds``: DistributedSampler gives every rank disjoint rows."""
    problem = fill_problem(len(ds), batch_size, world_size)
    if problem:
        raise DataError(problem)
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
    """Train rows and eval rows (given, or split off before packing so nothing leaks),
    each source's format told from its columns and brought to one shape (data/formats.py),
    the training sources mixed by data.weights."""
    from wlora_dist.data.formats import load_sources

    train, _, names = load_sources(cfg, cfg.train, seed, cfg.weights or None)
    log.info("data format: %s", "; ".join(names))
    if cfg.eval:
        return train, load_sources(cfg, cfg.eval, seed)[0]
    if cfg.eval_fraction <= 0 or len(train) < 2:
        return train, None
    parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _tokenise_pair(
    cfg: DataConfig, tokenizer: Any, train_rows: datasets.Dataset, eval_rows: datasets.Dataset | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    from wlora_dist.data.formats import canonical, normalised_format

    rows_cfg = canonical(cfg, normalised_format(train_rows.column_names))
    if eval_rows is not None and normalised_format(eval_rows.column_names) != rows_cfg.format:
        raise DataError(
            f"data.eval is {normalised_format(eval_rows.column_names)} data, data.train {rows_cfg.format}: give "
            "held-out rows of the training data's kind"
        )
    train = tokenize(train_rows, tokenizer, rows_cfg, cfg.train)
    return train, None if eval_rows is None else tokenize(eval_rows, tokenizer, rows_cfg, cfg.eval or cfg.train)


def prepare(
    cfg: DataConfig, seed: int, tokenizer: Any, cache_root: Path
) -> tuple[datasets.Dataset, datasets.Dataset | None, Path]:
    """Every row of data.train and data.eval read, told apart, tokenised (rows with nothing
    to train dropped or refused) and saved under ``cache_root`` (or found there): what rank
    0 does for a run, and what ``wlora-dist config --check`` does before it, so a run then
    starts from the check's copy. (train, eval, the copy's folder)."""
    train_rows, eval_rows = train_eval_split(cfg, seed)
    path = cache_root / data_cache.cache_key(cfg, seed, tokenizer, train_rows, eval_rows)
    found = data_cache.load(path)
    if found is not None:
        log.info("tokenised data: reusing %s", path)
        return (*found, path)
    train, eval_ds = _tokenise_pair(cfg, tokenizer, train_rows, eval_rows)
    if data_cache.save(path, train, eval_ds):
        log.info("tokenised data: %d train / %s eval rows saved in %s", len(train), _n(eval_ds), path)
        train, eval_ds = data_cache.load(path) or (train, eval_ds)  # memory-mapped, as other ranks
    return train, eval_ds, path


def tokenise_once(
    cfg: DataConfig, seed: int, tokenizer: Any, cache_root: Path, rank: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Collective. Rank 0 reads and tokenises (or finds the cache of an earlier run or of
    `config --check`) and saves the result under ``cache_root``; the other ranks load that
    copy. A rank that cannot see it (a node-local cache_dir on another node) tokenises for
    itself."""
    # Imported here: data.pipeline stays importable without torch.distributed set up.
    from wlora_dist.distributed.env import gather_objects

    status: dict[str, str] = {}
    if rank == 0:
        try:
            train, eval_ds, path = prepare(cfg, seed, tokenizer, cache_root)
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
    cfg: DataConfig,
    micro_batch: int,
    seed: int,
    tokenizer,
    rank: int,
    world_size: int,
    cache_root: Path,
    sequence_parallel: int = 1,
) -> tuple[DataLoader, DataLoader | None]:
    """This rank's training loader and its eval loader (None without eval data; a smaller
    micro-batch where the eval rows do not fill one of train's per rank). Collective: see
    tokenise_once. ``sequence_parallel``: ranks sharing each sequence read the same rows
    (the rows are split over world_size / N data ranks)."""
    train_ds, eval_ds = tokenise_once(cfg, seed, tokenizer, cache_root, rank)
    pad = tokenizer.pad_token_id
    data_rank, data_ranks = rank // sequence_parallel, world_size // sequence_parallel
    train = make_loader(train_ds, micro_batch, pad, data_rank, data_ranks, seed, True)
    if eval_ds is None:
        return train, None
    eval_batch = eval_micro_batch(len(eval_ds), micro_batch, data_ranks, bool(cfg.eval))
    if eval_batch < micro_batch and rank == 0:
        log.info("eval: %d rows for %d data ranks: micro-batches of %d", len(eval_ds), data_ranks, eval_batch)
    return train, make_loader(eval_ds, eval_batch, pad, data_rank, data_ranks, 0, False)
