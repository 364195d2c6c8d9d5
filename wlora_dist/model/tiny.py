"""The embedded default: a tiny random-init Llama, a byte-level tokenizer and a small
generated dataset, all made locally (these machines cannot download weights or data).

    python -m wlora_dist.tiny --out runs/tiny     # writes model/, data/train.jsonl, ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + <pad>, <s>, </s>; no merges, no files needed."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=SPECIALS.index("<pad>") + 256,
        bos_token_id=257,
        eos_token_id=258,
        tie_word_embeddings=False,
        # Wide init: with the default 0.02 a frozen random lm_head keeps every logit near 0 and
        # LoRA alone cannot move the loss off ln(vocab); 0.3 lets the demo loss fall visibly.
        initializer_range=0.3,
    )


def make_model(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, hidden, layers))
    return model.float().eval()


NAMES = ["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]
ITEMS = ["apples", "pears", "plums", "books", "coins", "shells"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short arithmetic stories: learnable structure, so loss falls visibly in minutes."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, other = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"{who} has {a} {item}. {other} gives {who} {b} more. how many {item} has {who}?"
        response = f"{who} has {a + b} {item}."
        rows.append({"text": f"{prompt} {response}", "prompt": prompt, "response": response})
    return rows


def write_default(out: Path, rows: int = 2000, hidden: int = 64, layers: int = 4, seed: int = 0) -> Path:
    """Write model/ (HF folder with tokenizer) and data/{train,eval}.jsonl under ``out``."""
    out = Path(out)
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), hidden, layers, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    all_rows = make_rows(rows + rows // 10, seed)
    for name, part in (("train", all_rows[:rows]), ("eval", all_rows[rows:])):
        with open(data / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny", help="folder to write model/ and data/ into")
    ap.add_argument("--rows", type=int, default=2000, help="training rows to generate")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Llama")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny Llama")
    args = ap.parse_args(argv)
    out = write_default(Path(args.out), args.rows, args.hidden, args.layers)
    print(f"tiny Llama -> {out / 'model'}; data -> {out / 'data'}")


if __name__ == "__main__":
    main()
