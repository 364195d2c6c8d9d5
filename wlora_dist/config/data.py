"""data.*: the training and eval rows, their format, and how they become tokens."""

from __future__ import annotations

from typing import Annotated, Literal

from wlora_dist.config.fields import Float, FloatList, Section, StrList, at_least, field, in_unit


class DataConfig(Section):
    train: StrList = field([], "Training data: json/jsonl/csv/parquet files, a saved dataset folder, or a hub id.")
    eval: StrList = field([], "Held-out data in the same forms; empty = split eval_fraction off train.")
    eval_fraction: Annotated[Float, in_unit()] = field(
        0.05, "Share of the training rows held out when no eval data is given."
    )
    format: Literal["auto", "text", "instruction", "chat"] = field(
        "auto",
        "auto: told from each source's columns (text first; then messages; ShareGPT conversations with from/value; "
        "TRL prompt + completion; prompt + response; Alpaca instruction + input + output), the choice logged; text: "
        "causal LM packed to seq_len; instruction: loss on the response only; chat: messages (loss on the "
        "assistant turns).",
    )
    weights: FloatList = field(
        [],
        "One per data.train source: its share of the training rows (a source resampled, seeded, to that share "
        "of all the rows); empty = every row once.",
    )
    text_field: str = field("text", "Column with the text (format=text).")
    prompt_field: str = field("prompt", "Column with the prompt (format=instruction).")
    response_field: str = field("response", "Column with the response (format=instruction).")
    messages_field: str = field("messages", "Column with the chat messages (format=chat).")
    split: str = field("train", "Split to read from a hub dataset or a saved DatasetDict.")
    seq_len: Annotated[int, at_least(2)] = field(
        256, "Tokens per training row (text is packed to it; longer rows are truncated)."
    )
    truncate: bool = field(True, "Truncate instruction/chat rows longer than seq_len (else it is an error).")
    max_untrained_share: Annotated[Float, in_unit()] = field(
        0.1,
        "instruction / chat rows with no token to train on (an empty reply; no reply token left after the template "
        "and the truncation to data.seq_len) are dropped and counted; more than this share of a split refuses the "
        "run (a seq_len too short for the data), and so does a split with no trained token at all.",
    )
    template: Literal["auto", "chat", "plain"] = field(
        "auto",
        "format=instruction: chat = the prompt as the user turn and the response as the assistant turn through "
        "the tokenizer's chat template (as TRL does for prompt/completion data); plain = prompt + ' ' + "
        "response + EOS; auto = chat when the tokenizer has a template (instruct models), else plain.",
    )
    packing: bool = field(
        False,
        "format=instruction / chat: pack several rows into each seq_len row (in order, as many as fit), with "
        "position ids restarting per row so no token attends to another row's (the loss of every row is what it "
        "is unpacked). format=text is always packed (one stream).",
    )
    cache_dir: str = field(
        "",
        "Where rank 0 writes the tokenised data (datasets' Arrow files, keyed by data, tokenizer and these "
        "settings) for every rank to read, and any later run of the same data to reuse; empty = the shared cache "
        "$WLORA_DATA_CACHE, else $XDG_CACHE_HOME/wlora_dist/data, else ~/.cache/wlora_dist/data. On several "
        "nodes: a folder every node sees.",
    )
