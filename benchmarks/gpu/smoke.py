"""The device call's smoke test: can this machine do what the checks and the modes need?
One JSON line per item on stdout (benchmarks/gpu/call.py files them in results.jsonl):

    bnb_int8_quantise   bitsandbytes' LLM.int8 row quantisation on the device, round trip
    bnb_4bit_quantise   bitsandbytes' NF4 quantisation (double quantisation on), round trip
    deepspeed_import    DeepSpeed imports (its CUDA ops are not built: torch's Adam is used)
    process_group       a one-rank process group on NCCL (gloo on CPU), one all-reduce
    matmul_peak         the bf16 matmul rate (float32 on CPU): the peak MFU is measured against

    python -m benchmarks.gpu.smoke [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch


def bnb_int8(device: torch.device) -> dict:
    import bitsandbytes.functional as F

    w = torch.randn(512, 512, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    codes, scales, _ = F.int8_vectorwise_quant(w)
    back = codes.float() * scales.float().unsqueeze(1) / 127
    return {"device": str(codes.device), "codes_dtype": str(codes.dtype), "rel_err": _rel(back, w)}


def bnb_4bit(device: torch.device) -> dict:
    import bitsandbytes.functional as F

    w = torch.randn(512, 512, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    back = F.dequantize_4bit(packed, state)
    return {"device": str(packed.device), "rel_err": _rel(back, w)}


def deepspeed_import(device: torch.device) -> dict:
    import deepspeed

    return {"version": deepspeed.__version__}


def process_group(device: torch.device) -> dict:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.full((4,), 3.0, device=device)
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        version = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else None
        return {"backend": backend, "all_reduce": x.tolist(), "nccl": version}
    finally:
        dist.destroy_process_group()


def matmul_peak(device: torch.device) -> dict:
    """The best of a few timed matmuls of an n x n x n product (2 n^3 FLOPs each)."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (512, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / best / 1e12}


ITEMS: dict[str, Callable[[torch.device], dict]] = {
    "bnb_int8_quantise": bnb_int8,
    "bnb_4bit_quantise": bnb_4bit,
    "deepspeed_import": deepspeed_import,
    "process_group": process_group,
    "matmul_peak": matmul_peak,
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    device = torch.device(ap.parse_args(argv).device)
    for name, item in ITEMS.items():
        t0 = time.perf_counter()
        try:
            line = {"ok": True, **item(device)}
        except Exception as e:  # each item on its own: one that fails does not hide the others
            line = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        line = {"kind": "smoke", "name": name, "seconds": round(time.perf_counter() - t0, 3), **line}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
