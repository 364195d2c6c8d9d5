"""Runs the trainer in this process (alone, or as one rank under torchrun) and writes what
the distributed tests compare to <output.dir>/rank<R>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py cfg.json
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wlora_dist.config import config_from_dict
from wlora_dist.distributed.env import exit_now, init_distributed, shutdown
from wlora_dist.training.tracking import setup_logging
from wlora_dist.training.trainer import Trainer


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t  # collective for DTensors


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(full(t.detach()).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def local_bytes(t):
    t = t.to_local() if isinstance(t, DTensor) else getattr(t, "ds_tensor", t)  # FSDP2 / ZeRO-3 shard
    return t.numel() * t.element_size()


def local_digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else getattr(t, "ds_tensor", t)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resident_bytes(t):
    """Bytes this rank really holds for a base parameter between steps: its shard, plus
    the full .data where ZeRO-3 kept it (a persisted or never released parameter), plus
    hpZ's secondary partition."""
    if hasattr(t, "ds_tensor"):
        secondary = getattr(t, "ds_secondary_tensor", None)
        extra = 0 if secondary is None else secondary.numel() * secondary.element_size()
        return local_bytes(t) + t.data.numel() * t.element_size() + extra
    return local_bytes(t)


def base_resident(trainer) -> int:
    return sum(resident_bytes(p) for p in trainer.wl.peft_model.parameters() if not p.requires_grad)


def _quantised():
    from wlora_dist.model.int8 import Int8Linear
    from wlora_dist.model.nf4 import Linear4bit

    return Int8Linear, Linear4bit


def _stored(m):
    """A quantised linear's stored tensors: (int8 weight, SCB) or (packed 4-bit, absmax)."""
    return (m.weight, m.SCB) if hasattr(m, "SCB") else (m.weight, m.absmax)


def watch_int8_forward(model):
    """What the first quantised linear holds while its forward runs (gathered under FSDP2 /
    ZeRO-3)."""
    seen = {}
    for m in model.modules():
        if isinstance(m, _quantised()):

            def hook(mod, args):
                weight, scale = _stored(mod)
                seen.update(
                    weight_dtype=str(weight.dtype),
                    weight_shape=list(weight.shape),
                    weight_type=type(weight).__name__,
                    scb_dtype=str(scale.dtype),
                )

            m.register_forward_pre_hook(hook)
            return seen
    return seen


def int8_info(trainer):
    """Every quantised linear's stored tensors (int8 weight and scales, or packed 4-bit codes
    and absmax): names, this rank's bytes, total bytes and a digest of the full (gathered)
    values."""
    mods = [(n, m) for n, m in trainer.wl.peft_model.named_modules() if isinstance(m, _quantised())]
    if not mods:
        return None
    params = [t for _, m in mods for t in _stored(m)]
    shapes = [getattr(p, "ds_shape", p.shape) for p in params]
    return {
        "names": [n.split("base_model.model.", 1)[-1].replace(".base_layer", "") for n, _ in mods],
        "local_bytes": sum(local_bytes(p) for p in params),
        "total_bytes": sum(torch.Size(s).numel() * p.element_size() for s, p in zip(shapes, params, strict=True)),
        "dtypes": sorted({str(getattr(p, "ds_tensor", p).dtype) for p in params}),
        "digest": digest(trainer.backend.gather_full(params)),
        # Double quantisation's second-level state: buffers every rank keeps whole.
        "nested_digest": digest(
            [
                b
                for _, m in mods
                for b in (getattr(m, "nested_absmax", None), getattr(m, "nested_offset", None))
                if b is not None
            ]
        ),
    }


def max_hooks_of_one_kind(model):
    """Most forward-pre hooks of one function on any module (2+ = an old engine's left over)."""
    worst = 0
    for module in model.modules():
        names = [getattr(h, "__qualname__", repr(h)) for h in module._forward_pre_hooks.values()]
        worst = max([worst] + [names.count(n) for n in set(names)])
    return worst


def main() -> None:
    """One run config, or a list of them run one after another in the same process group
    (each writes its records to its own output.dir)."""
    data = json.loads(Path(sys.argv[1]).read_text())
    cfgs = [config_from_dict(c) for c in (data if isinstance(data, list) else [data])]
    env = init_distributed(cfgs[0].distributed.timeout_minutes)
    setup_logging(env.is_main)
    # The trainers stay alive until the group is left: torn down first, a rank's gloo
    # threads could still be in use and abort the process at exit.
    trainers = [run(cfg, env) for cfg in cfgs]
    shutdown()
    exit_now(trainers)


def run(cfg, env) -> Trainer:
    trainer = Trainer(cfg, env, handle_signals=True)  # as the command line runs it
    trainer.setup()
    # What each rank holds of the base once set up: loaded, or loaded and resumed.
    base_after_setup = base_resident(trainer)
    int8_forward = watch_int8_forward(trainer.wl.peft_model)
    result = trainer.train()
    trainer.cleanup()
    import gc

    gc.collect()
    events = trainer.layout.record.events
    last = events[-1] if events else None
    removed = last.removed if last is not None else []  # the last change's removed A / B tensors
    prune = [e for e in events if e.change.kind == "prune"]
    out = {
        "world_size": env.world_size,
        "global_rank": env.global_rank,
        "torch_dist_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "dist_backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "device": str(env.device),
        "losses": [h["loss"] for h in result.history],
        "local_losses": [h["local_loss"] for h in result.history],
        "kept": result.kept,
        "site_names": [s.name for s in trainer.wl.sites],
        "gates": trainer.wl.gates.tolist(),
        "gates_digest": digest([trainer.wl.gates]),
        "params_digest": digest(trainer.backend.gather_full(trainer.wl.trainable_parameters())),
        "n_trainable": len(trainer.wl.trainable_parameters()),
        "removed_alive": sum(r() is not None for r in removed),
        "n_removed": len(removed),
        "memory": result.memory,
        "loaded_partitioned": trainer.backend.loaded_partitioned,
        "max_same_hooks": max_hooks_of_one_kind(trainer.wl.peft_model),
        "load_bytes_read": getattr(trainer.backend.load_stats, "bytes_read", None),
        "prune_losses": prune[-1].probe_losses if prune else None,
        "rounds_log": trainer.layout.record.rounds_log,
        "adam_steps": sorted(
            {float(st["step"]) for st in getattr(trainer.backend.optimizer, "state", {}).values() if "step" in st}
        ),
        "backend": trainer.backend.name,
        "quantization": cfg.model.quantization + ("-dq" if cfg.model.bnb_4bit_use_double_quant else ""),
        "base_local_bytes": sum(local_bytes(p) for p in trainer.wl.peft_model.parameters() if not p.requires_grad),
        "base_total_bytes": sum(
            torch.Size(getattr(p, "ds_shape", p.shape)).numel() * p.element_size()
            for p in trainer.wl.peft_model.parameters()
            if not p.requires_grad
        ),
        "base_resident_bytes": base_resident(trainer),
        # What this rank's shards of the base are (equal on the ranks of one HSDP shard
        # position, different within a shard group) and the mesh they live on.
        "base_local_digest": local_digest(p for p in trainer.wl.peft_model.parameters() if not p.requires_grad),
        "mesh_shape": list(trainer.backend.mesh.shape) if hasattr(trainer.backend, "mesh") else None,
        "base_resident_after_setup": base_after_setup,
        "int8": int8_info(trainer),
        "int8_forward": int8_forward,
        "param_types": sorted({type(p).__name__ for p in trainer.wl.peft_model.parameters()}),
        "eval_loss": result.eval_loss,
    }
    Path(cfg.output.dir, f"rank{env.global_rank}.json").write_text(json.dumps(out))
    return trainer


if __name__ == "__main__":
    main()
