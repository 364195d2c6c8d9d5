"""One rank of the sequence-parallel check: the same batches through one process's model
(sdpa, the whole sequence) and through N ranks sharing each sequence (Ulysses), N = 2 and
4 on a world of 4; writes each comparison to <out>/rank<R>.json.

    python -m torch.distributed.run --nproc_per_node 4 tests/sequence_parallel_worker.py OUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wlora_dist.distributed.env import exit_now
from wlora_dist.distributed.sequence_parallel import shard_batch, use_sequence_parallel
from wlora_dist.model.tiny import make_model

PAD = 0


def batches() -> dict[str, dict[str, torch.Tensor]]:
    """Rows of 13 tokens (a multiple of neither 2 nor 4), one right-padded; and packed rows
    of 14 whose documents restart their positions (padding is a document of its own)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = torch.ones_like(ids)
    ids[1, 9:], labels[1, 9:], mask[1, 9:] = PAD, -100, 0
    packed = torch.randint(3, 300, (2, 14), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7], [*range(11), 0, 1, 2]])
    plabels = packed.clone()
    plabels[0, 6:8] = -100
    plabels[1, 11:] = -100  # padding
    return {
        "rows": {"input_ids": ids, "labels": labels, "attention_mask": mask},
        "packed": {"input_ids": packed, "labels": plabels, "position_ids": pos},
    }


def saved_bytes(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, int]:
    """(the loss, the bytes autograd saved for backward in its forward): every saved tensor
    that is not a parameter (or a view of one), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    return loss, sum(seen.values())


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(sys.argv[1])
    groups = {n: [dist.new_group(list(range(s, s + n))) for s in range(0, world, n)] for n in (2, 4)}
    results = []
    for name, batch in batches().items():
        model = make_model(300, hidden=64, layers=2)  # 4 query heads, 2 key/value heads
        model.config.use_cache = False
        model.config._attn_implementation = "sdpa"
        ref, ref_bytes = saved_bytes(model, batch)
        ref.backward()
        want = grads(model)
        for n, sp_groups in groups.items():
            group = sp_groups[rank // n]
            use_sequence_parallel(model, group)
            loss, sp_bytes = saved_bytes(model, shard_batch(batch, n, rank % n, PAD))
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total, group=group)  # the chunks' losses add up to the sequence's
            got = grads(model)
            diff = 0.0
            for k, g in got.items():
                dist.all_reduce(g, group=group)  # so do their gradients
                diff = max(diff, (g - want[k]).abs().max().item())
            results.append(
                {"batch": name, "n": n, "loss": total.item(), "ref": ref.item(), "grad_diff": diff}
                | {"saved_bytes": sp_bytes, "ref_saved_bytes": ref_bytes}
            )
            model.config._attn_implementation = "sdpa"
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main()
