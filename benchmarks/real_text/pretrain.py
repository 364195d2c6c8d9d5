"""A small Llama pretrained here on real text (the standard library's docstrings), saved as
an HF folder with its BPE tokenizer; cached by everything that decides its weights.

    python -m benchmarks.real_text.pretrain --out runs/pretrained     # or let chance.py call it

Reproducible: fixed seeds, one thread order-independent loop on CPU; the cache key is the
SHA-256 of the corpus, the shape and the steps, so a new interpreter (another stdlib)
pretrains again rather than reusing a model of other text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.real_text import corpus

SPECIALS = ["<pad>", "<s>", "</s>"]


@dataclass(frozen=True)
class PretrainSpec:
    vocab: int = 2048
    hidden: int = 128
    layers: int = 8
    intermediate: int = 344
    heads: int = 4
    seq_len: int = 128
    batch: int = 16
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0
    max_chars: int | None = None  # None: the whole corpus

    def key(self, text_sha: str) -> str:
        blob = json.dumps({**asdict(self), "corpus": text_sha, "v": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_tokenizer(text: str, vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus (tokenizers' trainer, deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )


def model_config(spec: PretrainSpec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=4 * spec.seq_len,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def pretrained_model(spec: PretrainSpec, cache: Path, log=print, progress=None) -> Path:
    """The HF folder of the pretrained model for ``spec`` (pretrained now if not cached)."""
    text = corpus.pretraining_text(spec.max_chars)
    out = cache / f"pretrained-{spec.key(corpus.sha256(text))}"
    if (out / "pretrain.json").is_file():
        return out
    t0 = time.time()
    torch.manual_seed(spec.seed)
    tok = train_tokenizer(text, spec.vocab)
    ids = torch.tensor(tok(text.replace("\n\n", tok.eos_token))["input_ids"], dtype=torch.long)
    n_val = len(ids) // 50  # the last 2% is held out
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    model = LlamaForCausalLM(model_config(spec)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    warm = max(1, spec.steps // 20)
    model.train()
    for step in range(1, spec.steps + 1):
        mult = (
            step / warm
            if step <= warm
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (spec.steps - warm)))
        )
        for g in opt.param_groups:
            g["lr"] = spec.lr * mult
        starts = torch.randint(0, len(train_ids) - spec.seq_len - 1, (spec.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + spec.seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step, spec.steps, float(loss.detach()))
    model.eval()
    with torch.no_grad():
        chunks = val_ids[: (len(val_ids) // spec.seq_len) * spec.seq_len].view(-1, spec.seq_len)[:64]
        val_loss = float(model(input_ids=chunks, labels=chunks).loss)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {
        "spec": asdict(spec),
        "corpus": "Python standard library docstrings (PSF-2.0)",
        "corpus_sha256": corpus.sha256(text),
        "corpus_chars": len(text),
        "tokens": len(ids),
        "train_loss_last": float(loss.detach()),
        "heldout_loss": val_loss,
        "unigram_entropy": _unigram_entropy(train_ids, spec.vocab),
        "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
    tmp.rename(out)
    unigram = info["unigram_entropy"]
    log(f"pretrained {out.name}: held-out loss {val_loss:.2f} (unigram {unigram:.2f}) in {info['seconds']} s")
    return out


def _unigram_entropy(ids: torch.Tensor, vocab: int) -> float:
    """The loss of a model that knows only token frequencies: what pretraining must beat."""
    p = torch.bincount(ids, minlength=vocab).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--steps", type=int, default=PretrainSpec.steps)
    args = ap.parse_args(argv)
    print(pretrained_model(PretrainSpec(steps=args.steps), args.cache))


if __name__ == "__main__":
    main()
