"""What a training step holds per rank, per byte of frozen base: every backend, real gloo
processes on CPU, bf16 / 8-bit / 4-bit bases (the numbers docs/measurements.md quotes;
tests/test_step_memory.py asserts them).

    python -m benchmarks.step_memory --world 2 4                 # the project's settings
    python -m benchmarks.step_memory --world 2 --deepspeed-defaults   # DeepSpeed's own ZeRO sizes

Two Llamas that differ only in depth (4 and 16 decoder layers, hidden 512) are trained
under each backend; what differs between their steps' peaks is what the 12 extra layers
cost (fixed buffers cancel out; rank-1 adapters and 4-token activations are small beside a
layer's weights). Both are deeper than what a sharding backend holds gathered at once (the
running layer, the prefetched one, one more in flight), so that cap cancels out too. What
a step allocates on top of its base varies by up to one layer from step to step (when an
asynchronous all-gather's buffer is freed against the next one's); 12 layers of difference
keep that under 0.09 per byte of base. A step's peak is the rank's base bytes between steps plus the most the
step allocates on top, counted as tensors (benchmarks/step_memory_worker.py). Per byte of
base it should be about 1 / world size where the base is sharded (FSDP2, ZeRO-3) and about
1 where it is replicated (replicated, ZeRO-1/2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "step_memory_worker.py"
DEPTHS = (4, 16)
HIDDEN, INTERMEDIATE, VOCAB = 512, 1408, 259
SHARDED = ("fsdp2", "zero3")
# A bf16 base on every backend; the quantised bases replicated (ZeRO-2's, as ZeRO-1's and
# the replicated backend's) and sharded (FSDP2, ZeRO-3). ZeRO-3 runs last: its
# HfDeepSpeedConfig stays registered with transformers while its model lives, and a later
# ZeRO-1/2 load in the same process would be partitioned.
CASES = [
    *[(b, "bf16") for b in ("replicated", "zero1", "zero2", "fsdp2", "zero3")],
    *[(b, q) for q in ("int8", "nf4") for b in ("zero2", "fsdp2", "zero3")],
]
CASES.sort(key=lambda c: c[0] == "zero3")
# DeepSpeed's own sizes, to show what wlora_dist's (distributed/zero_config.py, memory_limits) change.
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}

Launcher = Callable[[Path, Path, int], None]  # (worker, specs.json, processes)


def write_models(root: Path) -> dict[int, Path]:
    """The two random-init Llamas (float32 safetensors), one per depth."""
    from transformers import LlamaForCausalLM

    from wlora_dist.model.tiny import tiny_llama_config

    out = {}
    for layers in DEPTHS:
        folder = root / f"layers{layers}"
        if not (folder / "model.safetensors").is_file():
            config = tiny_llama_config(VOCAB, HIDDEN, layers)
            config.intermediate_size = INTERMEDIATE  # a multiple of the 4-bit block size
            LlamaForCausalLM(config).save_pretrained(folder)
        out[layers] = folder
    return out


def spec(models: dict[int, Path], out: Path, backend: str, base: str, layers: int, ds_defaults: bool) -> dict:
    run = out / f"{backend}-{base}-{layers}"
    cfg: dict = {
        "model": {"path": str(models[layers]), "quantization": "none" if base == "bf16" else base},
        "adapter": {"lora_rank": 1, "lora_alpha": 2},
        # Steps 2 to 5 are measured, in the selection phase (every adapter trains); the
        # prune event after step 6 is not. (Fewer steps measure the least step less surely:
        # with 2, ZeRO-3 on the 4-bit base read 0.43 per base byte at 4 ranks, 0.36 with 4.)
        "selection": {"method": "topk", "k": 4, "steps": 6, "project_every": 6},
        "data": {"train": ["<random tokens>"], "seq_len": 4},
        "train": {"max_steps": 6, "micro_batch_size": 1},
        "log": {"trackers": [], "progress_bar": False},
        "output": {"dir": str(run), "reports": False},
        "checkpoint": {"save_on_signal": False},
        "distributed": {"backend": backend, "timeout_minutes": 10},
    }
    if base == "bf16":
        cfg["model"]["dtype"] = "bfloat16"
    if base == "nf4":
        cfg["model"]["bnb_4bit_blocksize"] = 64
    if backend.startswith("zero"):
        stage = int(backend[-1])
        zero: dict = {"stage3_param_persistence_threshold": 0} if stage == 3 else {}  # small params partitioned too
        if ds_defaults:
            zero.update({k: v for k, v in DEEPSPEED_DEFAULTS.items() if stage == 3 or not k.startswith("stage3")})
        ds_json = out / f"ds_{backend}{'_defaults' if ds_defaults else ''}.json"
        ds_json.write_text(json.dumps({"zero_optimization": zero}))
        cfg["distributed"] = {"backend": "zero", "zero": {"stage": stage, "config_file": str(ds_json)}}
    return {"tag": f"{backend}-{base}-{layers}", "vocab": VOCAB, "cfg": cfg}


def launch(worker: Path, specs: Path, nproc: int) -> None:
    """torchrun ``worker specs`` in a session of its own, killed whole if this ends first."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", str(worker), str(specs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(err.decode(errors="replace")[-4000:])


def measure(
    world: int, root: Path, models: dict[int, Path], ds_defaults: bool = False, run: Launcher = launch
) -> dict[tuple[str, str], list[list[dict]]]:
    """(backend, base) -> [per-rank records at the two DEPTHS], from one launch."""
    out = root / f"world{world}{'-ds-defaults' if ds_defaults else ''}"
    out.mkdir(parents=True, exist_ok=True)
    specs = [spec(models, out, b, q, d, ds_defaults) for b, q in CASES for d in DEPTHS]
    first = Path(specs[0]["cfg"]["output"]["dir"])
    first.mkdir(parents=True, exist_ok=True)
    (out / "specs.json").write_text(json.dumps(specs))
    run(WORKER, out / "specs.json", world)
    ranks = [json.loads((first / f"memory-rank{r}.json").read_text()) for r in range(world)]
    by_tag = {rec["tag"]: [ranks[r][i] for r in range(world)] for i, rec in enumerate(ranks[0])}
    return {(b, q): [by_tag[f"{b}-{q}-{d}"] for d in DEPTHS] for b, q in CASES}


def per_base_byte(shallow: dict, deep: dict, worst: bool = False) -> float:
    """Growth of a step's peak (base held + the step's allocations) per byte of base: of the
    least step, or (``worst``) of the deep model's worst step over the shallow one's least."""
    extra = ("step_extra", "step_extra_max" if worst else "step_extra")
    peak = [r["base_held"] + r[key] for r, key in zip((shallow, deep), extra, strict=True)]
    return (peak[1] - peak[0]) / (deep["base_total"] - shallow["base_total"])


def table(results: dict[int, dict], label: str) -> str:
    worlds = sorted(results)
    head = "| backend | base | " + " | ".join(f"{w} ranks: steady / worst step" for w in worlds) + " |"
    lines = [f"{label}: a step's peak per byte of base, the most of any rank", "", head]
    lines.append("|---|---|" + "---|" * len(worlds))
    for case in CASES:
        cells = []
        for w in worlds:
            runs = results[w][case]
            steady = max(per_base_byte(runs[0][r], runs[1][r]) for r in range(w))
            worst = max(per_base_byte(runs[0][r], runs[1][r], worst=True) for r in range(w))
            cells.append(f"{steady:.2f} / {worst:.2f}")
        lines.append(f"| {case[0]} | {case[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes (one launch each)")
    ap.add_argument("--deepspeed-defaults", action="store_true", help="ZeRO with DeepSpeed's own bucket/live sizes")
    ap.add_argument("--out", type=Path, default=None, help="folder for models and results (default: a temp folder)")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="step-memory-"))
    models = write_models(root / "models")
    results = {w: measure(w, root, models, args.deepspeed_defaults) for w in args.world}
    label = "DeepSpeed's default ZeRO sizes" if args.deepspeed_defaults else "wlora_dist's settings"
    print(table(results, label))
    (root / "results.json").write_text(
        json.dumps({str(w): {f"{b}-{q}": v for (b, q), v in r.items()} for w, r in results.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
