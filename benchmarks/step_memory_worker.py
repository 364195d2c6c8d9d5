"""One launch of benchmarks/step_memory.py: runs the trainer on each config of a list (one
process group, one after another) and writes <first output.dir>/memory-rank<R>.json.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/step_memory_worker.py specs.json

Bytes are counted as tensors, not read from the process (several models pass through one
process, and glibc keeps freed buffers unless told otherwise): what a rank holds of the
frozen base between steps (its shards / partitions, plus anything left gathered), and the
most a training step allocates on top (torch's profiler sees every CPU tensor allocation:
DeepSpeed's and FSDP2's all-gather buffers, activations, gradient buckets).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import peak_during, random_batches, run_specs
from wlora_dist.config import config_from_dict
from wlora_dist.training.trainer import Trainer


def base_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(whole frozen base, this rank's bytes of it between steps): a DTensor's local shard,
    a ZeRO-3 partition plus its .data when left gathered, a plain tensor whole."""
    total = held = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        total += torch.Size(getattr(p, "ds_shape", p.shape)).numel() * p.element_size()
        if hasattr(p, "ds_tensor"):
            held += (p.ds_tensor.numel() + p.data.numel()) * p.element_size()
        else:
            local = p.to_local() if hasattr(p, "to_local") else p
            held += local.numel() * local.element_size()
    return total, held


def measure(spec: dict, env) -> tuple[dict, Trainer]:
    cfg = config_from_dict(spec["cfg"])
    trainer = Trainer(cfg, env)
    batches = random_batches(spec["vocab"], cfg.train.micro_batch_size, cfg.data.seq_len, env.global_rank)
    trainer.setup(batches=batches)
    trainer.backend.module.train()
    model = trainer.wl.peft_model
    total, loaded = base_bytes(model)
    trainer.train_step(1)  # the first step creates the optimizer state (and ZeRO-3 records its trace)
    held = base_bytes(model)[1]
    peaks = []
    for step in range(2, cfg.train.max_steps):  # selection steps (every adapter trains); the last prunes
        assert trainer.selector.change_at(step) is None, "the measured steps must not change the layout"
        peaks.append(peak_during(lambda s=step: trainer.train_step(s), env.device)[0])
    peaks.sort()
    trainer.probe_loss()  # a forward without backward (eval and the prune event's probe)
    record = {
        "tag": spec["tag"],
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "base_total": total,
        "base_held_after_load": loaded,
        "base_held": held,
        # The steady state (the least a step took) and the worst step: on CPU, FSDP2's
        # asynchronous gloo all-gathers sometimes overlap up to one layer more (a constant,
        # whatever the depth).
        "step_extra": peaks[0],
        "step_extra_max": peaks[-1],
        "step_extras": peaks,
        "base_held_after_forward_only": base_bytes(model)[1],
    }
    return record, trainer


def main() -> None:
    run_specs(measure, "memory")


if __name__ == "__main__":
    main()
