"""``wlora-dist generate``: complete prompts with an adapter on its base (or a merged model)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="generate from an adapter (or a merged model) to see what the fine-tune does",
        description="Load a peft adapter folder onto its base (or a full model folder) and complete prompts, "
        "through the tokenizer's chat template when it has one. Greedy unless --temperature > 0.",
    )
    g.add_argument("model", help="an adapter folder (runs/<name>/adapter) or a model folder (export --merged)")
    g.add_argument("--base", help="base model for an adapter (default: base_model_name_or_path in its config)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help='one prompt per line (.txt) or {"prompt": ...} rows (.jsonl)')
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    import torch

    from wlora_dist.generate import GenerateOptions, generate, load_for_generation, read_prompts

    prompts = read_prompts(args.prompt or [], args.prompts_file)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_generation(args.model, args.base, device)
    opts = GenerateOptions(args.max_new_tokens, args.temperature, args.top_p, not args.no_chat_template, args.seed)
    for prompt, completion in zip(prompts, generate(model, tokenizer, prompts, opts), strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}))
        else:
            print(f"### prompt\n{prompt}\n### completion\n{completion}\n")
    return 0
