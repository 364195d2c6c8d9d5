"""Arithmetic word problems, generated here and scored by exact match: a task a 135M model
can learn in a few hundred steps and whose answer is one number.

    Q: Mia has 47 stickers. She gives away 19. How many stickers does Mia have now?
    A: 28

Each row is TRL's prompt / completion (format instruction, template plain: the loss is on
" 28" and the end of text only). Three disjoint splits from one seeded stream: train (to
fine-tune), validation (to choose each method's learning rate) and test (to report), no
problem text in two of them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Rosa", "Kai", "Nina", "Theo", "Sara", "Ben"]
THINGS = ["apples", "stickers", "marbles", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Lena", "Rosa", "Nina", "Sara"} else "He") for n in NAMES}


def problem(rng: random.Random) -> tuple[str, int]:
    """One problem and its answer: an addition, a subtraction or a product of small numbers,
    or two steps of addition and subtraction."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    he = PRONOUN[name]
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return f"{name} has {a} {thing}. {he} gets {b} more. How many {thing} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {thing}. {he} gives away {b}. How many {thing} does {name} have now?", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} is that?", a * b
    a, b = rng.randint(5, 40), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (
        f"{name} has {a} {thing}, finds {b} more and then gives {c} to a friend. How many {thing} are left?",
        a + b - c,
    )


def rows(n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` distinct problems (none in ``exclude``) as prompt / completion rows."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        question, answer = problem(rng)
        prompt = f"Q: {question}\nA:"
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "completion": f" {answer}"})
    return out


def splits(train: int, validation: int, test: int, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Disjoint train / validation / test rows (test drawn first, so its rows do not change
    with the size of the others)."""
    test_rows = rows(test, seed * 3 + 1)
    val_rows = rows(validation, seed * 3 + 2, {r["prompt"] for r in test_rows})
    seen = {r["prompt"] for r in test_rows + val_rows}
    return {"train": rows(train, seed * 3 + 3, seen), "validation": val_rows, "test": test_rows}


def write(folder: Path, train: int, validation: int, test: int, seed: int = 0) -> dict[str, Path]:
    """The three splits as JSONL files in ``folder`` (written once)."""
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "validation", "test")}
    if not all(p.is_file() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in splits(train, validation, test, seed).items():
            tmp = paths[name].with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
            tmp.rename(paths[name])
    return paths


_NUMBER = re.compile(r"-?\d+")


def answer_of(generated: str) -> int | None:
    """The first integer of a generated answer (None: none)."""
    m = _NUMBER.search(generated)
    return int(m.group()) if m else None


def exact_match(generated: list[str], rows_: list[dict[str, str]]) -> float:
    right = sum(answer_of(g) == int(r["completion"]) for g, r in zip(generated, rows_, strict=True))
    return right / len(rows_)
