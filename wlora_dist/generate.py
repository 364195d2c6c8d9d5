"""`wlora-dist generate`: a quick look at what a fine-tune does, without writing code.

Loads a peft adapter folder (onto the base its adapter_config.json names, or --base) or a
full model folder (an `export --merged` output), applies the tokenizer's chat template to
each prompt when it has one, and generates greedily (or samples with --temperature > 0).
Everything here is transformers' and peft's own loading and ``generate``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wlora_dist.errors import UserError


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    chat_template: bool = True
    seed: int = 0


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """--prompt values, then a file's: one prompt per line (.txt) or {"prompt": ...} rows (.jsonl)."""
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path}: no such file")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    out.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f'{path} line {i}: expected a JSON object with a "prompt" field') from None
            else:
                out.append(line)
    if not out:
        raise UserError("give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def load_for_generation(path: str, base: str | None, device: torch.device):
    """(model, tokenizer) for an adapter folder or a full model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise UserError(f"{path}: no such folder; give an adapter folder (runs/<name>/adapter) or a model folder")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base_path = base or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise UserError(f"{adapter_cfg} names no base model; pass --base MODEL")
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(folder))
        tok_source = folder if (folder / "tokenizer_config.json").is_file() else base_path
    elif (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tok_source = folder
    else:
        raise UserError(f"{path}: neither an adapter folder (adapter_config.json) nor a model folder (config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
    return model.to(device).eval(), tokenizer


def generate(model, tokenizer, prompts: list[str], opts: GenerateOptions) -> list[str]:
    """The completion of each prompt (the new tokens only, decoded)."""
    torch.manual_seed(opts.seed)
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        if opts.chat_template and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=False,
            )
            ids = torch.as_tensor(ids).reshape(1, -1)
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        sample = opts.temperature > 0
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=opts.max_new_tokens,
                do_sample=sample,
                temperature=opts.temperature if sample else None,
                top_p=opts.top_p if sample else None,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out
