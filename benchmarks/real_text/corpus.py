"""Two corpora of real text no one in this project wrote, read from files every machine that
runs the project already has (no download):

- **pretraining**: the docstrings of the Python standard library (PSF-2.0 licence),
  parsed with ``ast`` from the interpreter's own ``.py`` files (tests excluded);
- **the task**: docstrings of four installed third-party libraries (numpy BSD-3-Clause,
  pandas BSD-3-Clause, torch BSD-3-Clause, transformers Apache-2.0): adapting to another
  domain's prose (arrays, frames, tensors, models), held out by source file.

Both are deterministic for a given interpreter and package versions; their SHA-256 is
recorded with every result.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import random
import re
import sysconfig
from pathlib import Path

LIBRARIES = ("numpy", "pandas", "torch", "transformers")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _py_files(root: Path) -> list[Path]:
    skip = re.compile(r"(^|/)(tests?|idle_test|testing|_vendor|site-packages)(/|$)")
    return sorted(p for p in root.rglob("*.py") if not skip.search(p.relative_to(root).as_posix()))


def pretraining_text(max_chars: int | None = None) -> str:
    """The standard library's docstrings, one per paragraph block, in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in _py_files(root):
        for doc in _docstrings(path):
            parts.append(doc.strip())
            total += len(parts[-1])
        if max_chars and total >= max_chars:
            break
    return "\n\n".join(parts)


def _clean(doc: str, max_chars: int) -> str:
    """A docstring's paragraphs, each on one line, cut at a paragraph end near max_chars."""
    paras = [" ".join(p.split()) for p in doc.strip().split("\n\n") if p.strip()]
    out = ""
    for p in paras:
        if out and len(out) + len(p) > max_chars:
            break
        out = f"{out}\n{p}" if out else p
    return out[:max_chars]


def task_rows(
    per_library: int, seed: int = 0, max_files: int | None = None, max_chars: int = 400
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) rows {"text", "library"}: docstrings of numpy, pandas, torch and
    transformers (at least 80 characters, cut near ``max_chars``, duplicates dropped),
    ``per_library`` of each library in all. A file's docstrings all go to the same side (a
    fifth of the files, chosen by a hash of their path, are held out), so held-out rows
    are not near-copies of training rows. ``max_files``: read only the first files of each
    library (the miniature)."""
    rng = random.Random(seed)
    train: list[dict[str, str]] = []
    held: list[dict[str, str]] = []
    for lib in LIBRARIES:
        spec = importlib.util.find_spec(lib)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the task reads {lib}'s docstrings; install it (it is a dependency of the project)")
        root = Path(next(iter(spec.submodule_search_locations)))
        seen: set[str] = set()
        found: list[tuple[bool, str]] = []
        for path in _py_files(root)[:max_files]:
            is_held = int(hashlib.sha256(path.relative_to(root).as_posix().encode()).hexdigest(), 16) % 5 == 0
            for doc in _docstrings(path):
                text = _clean(doc, max_chars)
                if len(text) >= 80 and text not in seen:
                    seen.add(text)
                    found.append((is_held, text))
        if len(found) < per_library:
            raise RuntimeError(f"{lib} has {len(found)} usable docstrings, fewer than the {per_library} asked")
        for is_held, text in rng.sample(found, per_library):
            (held if is_held else train).append({"text": text, "library": lib})
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
