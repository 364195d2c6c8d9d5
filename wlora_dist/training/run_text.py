"""What a run says about itself in words: its start line (world, backend, adapters), its
length as resolved, and the model card's rows of where the adapter came from."""

from __future__ import annotations

from wlora_dist.checkpoint.meta import rows_per_step
from wlora_dist.config import RunConfig
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.method.weight_lora import WeightLoRA


def start_line(cfg: RunConfig, env: DistEnv, spec: BackendSpec, wl: WeightLoRA, trainable: int) -> str:
    """'world_size=2 backend=fsdp2 adapters n=14 (q_proj,...) trainable=... selection=topk K=4 T=10'."""
    sel = cfg.selection
    kinds = ",".join(dict.fromkeys(s.kind for s in wl.sites))
    return (
        f"world_size={env.world_size} backend={spec.name}{mesh_words(spec, env.world_size)} adapters n={wl.n} "
        f"({kinds}) trainable={trainable} params selection={sel.method} "
        f"K={sel.kept(wl.n) if sel.method == 'topk' else '-'} T={sel.steps}"
    )


def mesh_words(spec: BackendSpec, world_size: int) -> str:
    """' mesh=2x4 (replicas x shard group)' under HSDP; nothing otherwise."""
    replicas, shard = spec.mesh_shape(world_size)
    words = f" mesh={replicas}x{shard} (replicas x shard group)" if spec.shard_size and replicas > 1 else ""
    if spec.sequence_parallel > 1:
        words += f" sequence_parallel={spec.sequence_parallel}"
    return words


def run_length(cfg: RunConfig, world_size: int, steps_per_epoch: int | None, start_step: int) -> str:
    """The run's length as resolved (train.epochs, selection.steps_fraction and
    optim.warmup_ratio turned into step counts), said once at the start."""
    t, o = cfg.train, cfg.optim
    words = f"run length: {t.max_steps} optimizer steps"
    if steps_per_epoch:
        words += f" ({t.max_steps / steps_per_epoch:.3g} epochs of {steps_per_epoch} steps)"
    rows = rows_per_step(cfg, world_size)
    words += f", {rows} rows per step ({t.micro_batch_size} x {t.grad_accum_steps} accumulated x "
    sp = cfg.distributed.sequence_parallel
    groups = world_size // sp
    shared = f"{groups} group{'s' * (groups > 1)} of {sp} ranks sharing each sequence"
    ranks = f"{world_size} ranks" if sp == 1 else shared
    words += f"{ranks}); selection {cfg.selection.steps} steps, warmup {o.warmup_steps} steps"
    if start_step:
        words += f"; resuming after step {start_step}"
    return words


def card_rows(cfg: RunConfig, final_eval: dict) -> dict[str, str]:
    """The model card's record of where the adapter came from."""
    from wlora_dist.training.provenance import data_fingerprints, launcher_description

    data = cfg.data
    rows = {"launcher": launcher_description()}
    rows["training data"] = "<br>".join(data_fingerprints(data.train)) or "batches passed in"
    if data.eval:
        rows["eval data"] = "<br>".join(data_fingerprints(data.eval))
    if final_eval:
        rows["final eval loss"] = f"{final_eval['eval_loss']:.4f} (perplexity {final_eval['eval_ppl']:.2f})"
    return rows
