"""``wlora-dist preview``: a few rows of the training data as the model will see them,
tokens the loss trains on marked (what Axolotl's ``preprocess --debug`` shows): the
format taken for each source, the template's tokens, and where the loss starts."""

from __future__ import annotations

import argparse
import sys

from wlora_dist.config import load_config


def run(args: argparse.Namespace) -> int:
    import datasets

    from wlora_dist.data.formats import load_sources, shape_rows
    from wlora_dist.data.rows import ROW, SOURCE, DataError, first_rows
    from wlora_dist.data.tokens import tokenize
    from wlora_dist.model.loading import load_tokenizer
    from wlora_dist.noise import silence_known_noise

    silence_known_noise()
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    color = sys.stdout.isatty() and not args.no_color
    for source in cfg.data.train:
        rows = first_rows(source, args.rows)
        if rows is None:  # a hub dataset or a JSON array: read through the pipeline
            ds, rows_cfg, names = load_sources(cfg.data, [source])
            ds = ds.select(range(min(args.rows, len(ds))))
            name = names[0]
        else:
            if not rows:
                raise DataError(f"{source}: no rows")
            ds = datasets.Dataset.from_list([{**r, SOURCE: 0, ROW: i} for i, r in enumerate(rows)])
            ds, rows_cfg, shape = shape_rows(ds, cfg.data)
            name = shape.name
        print(f"== {source}: {name} -> data.format {rows_cfg.format}")
        if rows_cfg.format == "text":  # packed: show each row's own tokens (all trained)
            for i, text in enumerate(ds["text"]):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                _show(tokenizer, i, ids, ids, color, args.ids)
            continue
        out = tokenize(ds, tokenizer, rows_cfg.model_copy(update={"packing": False}), [source], whole=False)
        for i, row in enumerate(out):
            _show(tokenizer, i, row["input_ids"], row["labels"], color, args.ids)
    return 0


def _show(tokenizer, i: int, ids: list[int], labels: list[int], color: bool, with_ids: bool) -> None:  # type: ignore[no-untyped-def]
    from wlora_dist.data.rows import IGNORE

    trained = [lab != IGNORE for lab in labels]
    print(f"-- row {i}: {len(ids)} tokens, {sum(trained)} trained")
    if with_ids:
        print(
            " ".join(f"{tokenizer.decode([t])!r}({t}){'*' if on else ''}" for t, on in zip(ids, trained, strict=True))
        )
        return
    parts, start = [], 0
    for j in range(1, len(ids) + 1):  # runs of trained / untrained tokens
        if j == len(ids) or trained[j] != trained[start]:
            text = tokenizer.decode(ids[start:j])
            if trained[start]:
                text = f"\033[32m{text}\033[0m" if color else f"[[{text}]]"
            parts.append(text)
            start = j
    print("".join(parts))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preview",
        help="show the first rows of the training data as tokens, the trained ones marked",
        description="Read the first rows of each data.train source as `train` would (the format told from the "
        "columns, the tokenizer's template), and print each row's text with the tokens the loss trains on "
        "marked: [[like this]] (green at a terminal). Nothing is trained or written.",
    )
    p.add_argument("--config", "-c", required=True, help="run config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--rows", type=int, default=3, help="rows per source (default 3)")
    p.add_argument("--ids", action="store_true", help="every token with its id; * = trained")
    p.add_argument("--no-color", action="store_true", help="[[brackets]] even at a terminal")
