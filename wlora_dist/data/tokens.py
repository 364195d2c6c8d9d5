"""Rows to tokens, in one of three formats, and packing:

- text:        causal LM, rows joined with EOS and packed into seq_len blocks
- instruction: prompt + response (through the chat template as a user / assistant turn
               when the tokenizer has one, data.template), loss only on the response tokens
- chat:        a list of {role, content} messages through the tokenizer's chat template,
               loss only on the assistant turns

data.packing puts several instruction / chat rows in one seq_len row without attention
across them (position ids restarting per row)."""

from __future__ import annotations

import logging
import re
from typing import Any

import datasets

from wlora_dist.config import DataConfig
from wlora_dist.data.rows import IGNORE, DataError, _require_columns, _row_names

log = logging.getLogger("wlora_dist")


def tokenize(
    ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig, sources: list[str] | None = None, whole: bool = True
) -> datasets.Dataset:
    """Rows -> {input_ids, labels} lists, per cfg.format. ``sources``: the list ``ds`` was
    loaded from (load_rows), so errors name the file and its row. ``whole``: ``ds`` is a
    whole split, so rows with nothing to train are counted against data.max_untrained_share
    and dropped (a preview or the preflight's first rows are not: they keep them)."""
    if cfg.format == "auto":  # rows not yet brought to one shape (data/formats.py)
        from wlora_dist.data.formats import shape_rows

        ds, cfg, _ = shape_rows(ds, cfg)
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
        raise DataError(
            f"no row after tokenising: the text holds fewer than data.seq_len={cfg.seq_len} tokens (text is packed "
            "into rows of seq_len tokens, per 1,000 source rows); lower data.seq_len or add data"
        )
    if cfg.format != "text":
        out = drop_untrained(out, cfg) if whole else out.remove_columns(["untrained", "where"])
    if cfg.packing and cfg.format != "text":
        out = pack_rows(out, cfg.seq_len)
    return out


def drop_untrained(out: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    """Rows with nothing to train on (the ``untrained`` flag _instruction / _chat set):
    dropped and counted (with the first ones named), or the run refused where they are all
    or more than data.max_untrained_share of the rows: a NaN loss at step 1 says much less."""
    flags = out["untrained"]
    n = sum(flags)
    if n:
        names = sorted((w for w, f in zip(out["where"], flags, strict=True) if f), key=_natural)[:3]
        what = (
            f"{n} of {len(out)} rows have no token to train on (an empty reply, or no reply token left after the "
            f"template and the truncation to data.seq_len={cfg.seq_len}; first: {'; '.join(names)})"
        )
        if n == len(out) or n > cfg.max_untrained_share * len(out):
            limit = "every row" if n == len(out) else f"more than data.max_untrained_share={cfg.max_untrained_share:g}"
            raise DataError(
                f"{what}: {limit}. Raise data.seq_len if replies are cut away, fix the rows (a chat must end with "
                "the assistant's turn), or raise data.max_untrained_share to drop them"
            )
        log.warning("%s: dropped", what)
        out = out.filter(lambda f: not f, input_columns="untrained", desc="dropping rows with nothing to train")
    return out.remove_columns(["untrained", "where"])


def _natural(name: str) -> tuple:
    """'f.jsonl row 10' after 'f.jsonl row 9': the file's order, not the shuffled split's."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _untrained(labels: list[int], special: set[int]) -> bool:
    """No label to learn (the shifted loss never predicts a row's first token), or only the
    end-of-turn tokens a template adds after an empty reply."""
    return all(t == IGNORE or t in special for t in labels[1:])


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
    out: dict[str, list] = {"input_ids": [], "labels": [], "untrained": [], "where": []}
    special = set(tokenizer.all_special_ids)
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
            ids, labels = plain_instruction(prompt, response, tokenizer)
        ids, labels = _fit(ids, labels, i, cfg)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["untrained"].append(not response.strip() or _untrained(labels, special))
        out["where"].append(i)
    return out


def plain_instruction(prompt: str, response: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """A prompt / response row without a chat template: the prompt, one space, the response
    and EOS, with the loss on the response. No space is added where one is already there: a
    TRL completion (" blue.") or a prompt ending in a newline keeps its own separator."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    sep = "" if response[:1].isspace() or prompt[-1:].isspace() else " "
    r = tokenizer(sep + response, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    return p + r, [IGNORE] * len(p) + r


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
    out: dict[str, list] = {"input_ids": [], "labels": [], "untrained": [], "where": []}
    special = set(tokenizer.all_special_ids)
    for i, messages in zip(rows, batch[cfg.messages_field], strict=True):
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataError(f"{i}: {cfg.messages_field!r} must be a list of {{role, content}} messages")
        ids, labels = _fit(*_chat_row(messages, tokenizer), i, cfg)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        replies = [m.get("content") for m in messages if m["role"] == "assistant"]
        empty = not any(isinstance(r, str) and r.strip() for r in replies)
        out["untrained"].append(empty or _untrained(labels, special))
        out["where"].append(i)
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
