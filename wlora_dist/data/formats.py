"""The data formats the ecosystem writes, told apart by their columns, and each source's
rows brought to one of the three shapes the tokeniser reads (text / prompt + response /
messages), then mixed by weight.

    text (first: a source with a text column is read as text, as before auto)  -> text
    messages (OpenAI / TRL conversational)         -> chat
    conversations with from / value (ShareGPT)     -> chat (human -> user, gpt -> assistant)
    prompt + completion (TRL prompt-completion)    -> instruction
    prompt + response                              -> instruction
    instruction + input + output (Alpaca)          -> instruction (input appended to the instruction)

No library does this for a trainer of our own: TRL's dataset utilities convert for its
trainers' column conventions, Axolotl's and LLaMA-Factory's are tied to their configs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets

from wlora_dist.config import DataConfig
from wlora_dist.data.rows import ROW, SOURCE, DataError, _require_columns, concat_rows, load_parts

log = logging.getLogger("wlora_dist")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Shape:
    """What one source's rows are: the tokeniser's format and the name of what was found."""

    format: str  # text, instruction, chat
    name: str  # e.g. "ShareGPT conversations (from / value)"
    named: bool = False  # the config names its columns (data.format, or a data.*_field set): they must exist


def detect(columns: list[str], cfg: DataConfig) -> Shape:
    """The format of a source with ``columns``. data.format other than auto is taken as
    given (its *_field names the columns)."""
    if cfg.format != "auto":
        return Shape(cfg.format, f"data.format={cfg.format}", named=True)
    given = cfg.model_fields_set
    for fmt, fields in (("text", {"text_field"}), ("instruction", {"prompt_field", "response_field"})):
        if given & fields:  # a column the user named says the format
            return Shape(fmt, f"{fmt} (data.{' / data.'.join(sorted(given & fields))} set)", named=True)
    if "messages_field" in given:
        return Shape("chat", f"conversations (data.messages_field={cfg.messages_field!r})", named=True)
    cols = set(columns)
    if cfg.text_field in cols:  # first: what data.format's old default (text) read, read the same way
        return Shape("text", f"plain text ({cfg.text_field!r})")
    if cfg.messages_field in cols:
        return Shape("chat", f"conversations ({cfg.messages_field!r}: role / content)")
    if "conversations" in cols:
        return Shape("chat", "ShareGPT conversations ('conversations': from / value)")
    if "prompt" in cols and "completion" in cols:
        return Shape("instruction", "prompt / completion (TRL)")
    if cfg.prompt_field in cols and cfg.response_field in cols:
        return Shape("instruction", f"prompt / response ({cfg.prompt_field!r} / {cfg.response_field!r})")
    if {"instruction", "output"} <= cols:
        return Shape("instruction", "Alpaca (instruction / input / output)")
    shown = sorted(c for c in cols if c not in (SOURCE, ROW))
    raise DataError(
        f"columns {shown}: no known format ({cfg.text_field}; messages; conversations with from/value; prompt + "
        f"completion; {cfg.prompt_field} + {cfg.response_field}; instruction + input + output). Rename the "
        "columns, or set data.format and data.*_field (e.g. data.text_field)"
    )


def normalise(ds: datasets.Dataset, shape: Shape, cfg: DataConfig) -> datasets.Dataset:
    """The rows in the shape the tokeniser reads with the default field names: text,
    prompt / response, or messages of {role, content}."""
    keep = [c for c in (SOURCE, ROW) if c in ds.column_names]
    if shape.named and not (shape.format == "chat" and "conversations" in ds.column_names):
        fields = {"text": ["text_field"], "instruction": ["prompt_field", "response_field"], "chat": ["messages_field"]}
        _require_columns(ds, [getattr(cfg, f) for f in fields[shape.format]], fields[shape.format])
    if shape.format == "text":
        return _only(ds.rename_column(cfg.text_field, "text") if cfg.text_field != "text" else ds, ["text", *keep])
    if shape.format == "chat":
        field = cfg.messages_field if cfg.messages_field in ds.column_names else "conversations"
        if field not in ds.column_names:
            return ds  # the tokeniser names the missing column
        return _only(ds.map(lambda b: {"messages": [_turns(m) for m in b[field]]}, batched=True), ["messages", *keep])
    cols = set(ds.column_names)
    if not shape.named and {"prompt", "completion"} <= cols:
        return _only(ds.rename_column("completion", "response"), ["prompt", "response", *keep])
    alpaca_named = (
        shape.named and cfg.prompt_field == "instruction" and "input" in cols and "input" not in (cfg.response_field,)
    )
    if alpaca_named or (not shape.named and {"instruction", "output"} <= cols and cfg.prompt_field not in cols):
        # Alpaca's input column holds the question an instruction refers to: appended to the
        # prompt, never dropped (named fields included: prompt_field=instruction on Alpaca rows).
        response = cfg.response_field if shape.named else "output"
        if alpaca_named:
            log.info("data: Alpaca's 'input' column is appended to data.prompt_field 'instruction' (as format auto)")

        def alpaca(b: dict) -> dict:
            inputs = b.get("input") or [""] * len(b["instruction"])
            prompts = [
                f"{i}\n\n{x}" if isinstance(x, str) and x.strip() else i
                for i, x in zip(b["instruction"], inputs, strict=True)
            ]
            return {"prompt": prompts, "response": b[response]}

        return _only(ds.map(alpaca, batched=True), ["prompt", "response", *keep])
    if cfg.prompt_field in cols and cfg.response_field in cols:
        renamed = ds
        for old, new in ((cfg.prompt_field, "prompt"), (cfg.response_field, "response")):
            if old != new:
                renamed = renamed.rename_column(old, new)
        return _only(renamed, ["prompt", "response", *keep])
    return ds  # the tokeniser names the missing column


def _only(ds: datasets.Dataset, columns: list[str]) -> datasets.Dataset:
    return ds.remove_columns([c for c in ds.column_names if c not in columns])


def _turns(messages: object) -> object:
    """ShareGPT turns ({from, value}) as {role, content}; anything else unchanged (the
    tokeniser refuses what is not a list of role / content messages, naming the row)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:
            out.append({"role": SHAREGPT_ROLES.get(str(m["from"]), str(m["from"])), "content": m["value"]})
        else:
            out.append(m)
    return out


def normalised_format(columns: list[str]) -> str:
    """The format of rows ``normalise`` made (its column names say it)."""
    cols = set(columns)
    return "chat" if "messages" in cols else "instruction" if {"prompt", "response"} <= cols else "text"


def shape_rows(ds: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset, DataConfig, Shape]:
    """One source's rows told apart (``detect``), brought to their shape (``normalise``),
    and the settings to tokenise them with: what training, the preflight and the preview
    all do to a source."""
    shape = detect(ds.column_names, cfg)
    return normalise(ds, shape, cfg), canonical(cfg, shape.format), shape


def canonical(cfg: DataConfig, fmt: str) -> DataConfig:
    """The data settings the tokeniser reads normalised rows with."""
    return cfg.model_copy(
        update={
            "format": fmt,
            "text_field": "text",
            "prompt_field": "prompt",
            "response_field": "response",
            "messages_field": "messages",
        }
    )


def load_sources(
    cfg: DataConfig, sources: list[str], seed: int = 0, weights: list[float] | None = None
) -> tuple[datasets.Dataset, DataConfig, list[str]]:
    """Every source read, its format told from its columns, brought to one shape, tagged
    with (source, row) and, with ``weights``, mixed: (rows, the settings to tokenise them
    with, one description per source). Sources must agree on text / instruction / chat."""
    parts, shapes = [], []
    for part in load_parts(sources, cfg.split):
        part, _, shape = shape_rows(part, cfg)
        parts.append(part)
        shapes.append(shape)
    kinds = {s.format for s in shapes}
    if len(kinds) > 1:
        found = "; ".join(f"{src}: {s.name} -> {s.format}" for src, s in zip(sources, shapes, strict=True))
        raise DataError(f"data sources of different formats cannot be mixed ({found}); give sources of one kind")
    ds = concat_rows(mix(parts, weights, seed) if weights else parts, sources)
    names = [f"{src}: {s.name}" for src, s in zip(sources, shapes, strict=True)]
    return ds, canonical(cfg, shapes[0].format), names


def mix(parts: list[datasets.Dataset], weights: list[float], seed: int) -> list[datasets.Dataset]:
    """Each source resampled so its share of the rows is its weight's share (as many rows
    in all as the sources hold): a smaller share takes a seeded subset, a larger one every
    row once and then a seeded sample of the rest. LLaMA-Factory's interleave_probs and
    Axolotl's dataset weights do the same; written here because datasets' own
    interleave_datasets stops at the first or last exhausted source instead."""
    import numpy as np

    total = sum(len(p) for p in parts)
    share = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    rng = np.random.default_rng(seed)
    out = []
    for p, s in zip(parts, share, strict=True):
        want = round(float(s) * total)
        if want <= len(p):
            idx = rng.permutation(len(p))[:want]
        else:
            idx = np.concatenate([np.arange(len(p)), rng.integers(0, len(p), want - len(p))])
        out.append(p.select(np.sort(idx)))
    return out
