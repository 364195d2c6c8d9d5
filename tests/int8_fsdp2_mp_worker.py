"""One gloo process: an Int8Linear under FSDP2 with MixedPrecisionPolicy(param_dtype=bf16);
prints (JSON) the dtypes its forward sees, the output's and its error against bf16 input
times the dequantised weight. Run by tests/test_int8.py.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/int8_fsdp2_mp_worker.py
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wlora_dist.model.int8 import Int8Linear, dequantize, quantize_rows, scb_bits


def main() -> None:
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    cb, scb = quantize_rows(w)
    lin = Int8Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(cb)
        lin.SCB.copy_(scb_bits(scb))
    model = torch.nn.Sequential(lin)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)), mp_policy=mp)
    seen: dict = {}

    def hook(m: torch.nn.Module, args: tuple) -> None:
        seen.update(w=str(m.weight.dtype), scb=str(m.SCB.dtype), x=str(args[0].dtype))

    lin.register_forward_pre_hook(hook)
    stored = str(lin.weight.to_local().dtype)  # the DTensor shard, between steps
    x = torch.randn(4, 32)
    y = model(x)
    ref = x.to(torch.bfloat16).float() @ dequantize(cb, scb).T
    err = float((y.float() - ref).abs().max())
    print(json.dumps({**seen, "y": str(y.dtype), "err": err, "scale": float(ref.abs().max()), "stored": stored}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
