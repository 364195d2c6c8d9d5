"""In-process runs of the real training step on a random-init Llama of any shape, for
benchmarks and for checking the memory planner against measurement.

The trainer's own setup and ``train_step`` (the prune event included) run here, through
its public API and callbacks, on random token batches (all-ones attention masks, as packed text gives), so what is timed
and measured is what ``wlora-dist train`` runs. Peak memory: ``torch.cuda`` allocator
statistics on a GPU; on CPU, the allocation events torch's profiler records
(``profile_memory``), summed in time order — the CPU allocator has no peak counter.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from wlora_dist.config import RunConfig, config_from_dict, set_dotted
from wlora_dist.distributed.env import DistEnv, exit_now
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.checkpoint_reader import CheckpointReader
from wlora_dist.model.loading import enable_checkpointing
from wlora_dist.model.nf4 import Linear4bit
from wlora_dist.planning.shapes import ModelShape
from wlora_dist.training.callbacks import Callback
from wlora_dist.training.trainer import Trainer


def llama_config(shape: ModelShape) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.d,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )


def random_llama(
    shape: ModelShape,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    quant: str = "none",
    meta: bool = False,
    double_quant: bool = False,
) -> LlamaForCausalLM:
    """A random-init Llama built directly on ``device`` in ``dtype`` (no float32 detour).
    ``meta`` (or a quantised base: linears as Int8Linear / NF4 Linear4bit, lm_head kept in
    ``dtype`` as the product's default model.int8_skip_modules keeps it): structure only,
    for a backend to materialise with ``RandomWeights`` (each rank fills its own shard).
    ``quant``: none, int8 or nf4; ``double_quant``: the NF4 absmax quantised once more
    (QLoRA's)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if meta or quant != "none" else device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(default)
    if quant == "int8":
        from wlora_dist.model.int8 import to_int8_linears

        to_int8_linears(model, ["lm_head"], 6.0)
    elif quant == "nf4":
        from wlora_dist.model.nf4 import to_4bit_linears

        to_4bit_linears(model, ["lm_head"], "nf4", 64, None, double_quant)
    elif quant != "none":
        raise ValueError(f"quant={quant!r}: none, int8 or nf4")
    model.config.use_cache = False
    return model.requires_grad_(False)


class RandomWeights(CheckpointReader):
    """CheckpointReader's ``rows`` for a checkpoint that does not exist: random rows of
    the right dtype (float: N(0, 0.02); int8 weight: uniform int8; SCB: row absmax ~ 0.1),
    the same rows for the same (name, start) on every rank. A 4-bit layer's packed codes
    and absmax are not drawn: its float rows are (``_read``), and the reader quantises
    them as it quantises a checkpoint's (double quantisation included), so the codes are
    ones bnb's kernels really meet."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__("<random weights>", model, files={})
        # remove_duplicate=False: a tied lm_head is read under its own name too (llama3.2-1b).
        self.params = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters(remove_duplicate=False)}
        # Drawn on the GPU where there is one: 8B+ random rows on the CPU take minutes.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """An 8-bit layer's codes and scales are drawn as they are (quantising float rows
        would only cost time); everything else comes through CheckpointReader's ``rows``
        from ``_read``'s float rows (quantised there for a 4-bit layer)."""
        p = self.params[name]
        if p.dtype == torch.int8 or name.endswith(".SCB"):
            shape, gen = (stop - start, *p.shape[1:]), self._generator(name, start)
            if p.dtype == torch.int8:
                return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen, device=self.device)
            return (0.05 + 0.1 * torch.rand(shape, generator=gen, device=self.device)).view(torch.int32)
        return super().rows(name, start, stop)

    def _read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Float rows [start, stop) of tensor ``key``: N(0, 0.02), norms 1. A 4-bit layer's
        weight (which this model holds packed) comes as a bf16 checkpoint would hold it
        (float32 on CPU), for the reader to quantise."""
        layer = self.four_bit.get(key.removesuffix(".weight"))
        if layer is not None:
            shape = (stop - start, layer.in_features)
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            p = self.params[key]
            shape, dtype = (stop - start, *p.shape[1:]), p.dtype
        if key.endswith("norm.weight"):
            rows = torch.ones(shape, dtype=dtype, device=self.device)
        else:
            gen = self._generator(key, start)
            rows = (0.02 * torch.randn(shape, generator=gen, device=self.device)).to(dtype)
        self.bytes_read += rows.numel() * rows.element_size()
        self.tensors += 1
        return rows

    def _generator(self, name: str, start: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(zlib.crc32(name.encode()) + start)  # not hash(): salted

    def _whole_absmax(self, module: str, layer: Linear4bit) -> torch.Tensor:
        """The whole layer's first-level absmax, quantised here from rows every rank draws
        alike: the same on every rank without the gather, which a fake process group (the
        70B modes) would leave empty."""
        return self._quantised_rows(module, 0, layer.out_features)["absmax"].view(torch.float32)


def random_batches(vocab: int, micro_batch: int, seq_len: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bench_config(overrides: dict) -> RunConfig:
    """A run config for an in-process run: no data files, no model folder (the model is
    passed in), no logs or reports unless asked."""
    base = {
        "model": {"path": "<random-init>"},
        "data": {"train": ["<random tokens>"]},
        "log": {"trackers": [], "progress_bar": False},
        "output": {"reports": False},
        "checkpoint": {"save_on_signal": False},
    }
    for dotted, value in overrides.items():
        set_dotted(base, dotted, value)
    return config_from_dict(base, "benchmark")


class _Strip(Callback):
    """Before wrapping, for plain peft LoRA: remove the gates (exactly peft LoRA)."""

    def on_adapters_attached(self, trainer: Trainer, wl: WeightLoRA) -> None:
        wl.remove_gates()


class _BytesAtStepEnd(Callback):
    """Per-rank bytes of trainable parameters, gradients and optimizer state while the
    gradients exist (at the end of every optimizer step)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def on_optimizer_step_end(self, trainer: Trainer, optimizer_step: int) -> None:
        self.last = trainer.backend.memory_report()


@dataclass
class Harness:
    trainer: Trainer
    step_bytes: _BytesAtStepEnd
    step: int = 0

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        env: DistEnv,
        model: nn.Module,
        plain_lora: bool = False,
    ) -> Harness:
        """``plain_lora``: peft LoRA exactly, no gates (our forward hooks removed). Plain
        peft on a chosen set of adapters: name them in adapter.target_modules (full
        module names match exactly, as in peft)."""
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(model, cfg.model.checkpoint_every_n_layers)
        step_bytes = _BytesAtStepEnd()
        tr = Trainer(cfg, env, [_Strip(), step_bytes] if plain_lora else [step_bytes])
        batches = random_batches(
            model.config.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.seed + env.global_rank
        )
        tr.setup(model, weights=RandomWeights, batches=batches)  # RandomWeights fill models built on meta
        tr.backend.module.train()
        return cls(tr, step_bytes)

    def run_step(self) -> dict:
        """One optimizer step as the trainer runs it, prune event (or round) included."""
        self.step += 1
        return self.trainer.train_step(self.step)

    def timed_steps(self, n: int) -> dict:
        """``n`` steps (synchronised on a GPU): tokens/s of the median step, which one slow
        step (a page fault, another process) does not move, and the spread of the steps.
        tokens/s counts every rank's tokens (the trainer's figure); per GPU divides by the
        world size (under the fake process group: one rank, compute only)."""
        device = self.trainer.env.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        steps = []
        for _ in range(n):
            sync()
            s0 = time.perf_counter()
            m = self.run_step()
            sync()
            steps.append((time.perf_counter() - s0, m["tokens_per_s"] * m["step_seconds"]))
        seconds = sorted(s for s, _ in steps)
        median_s = seconds[len(seconds) // 2]
        tokens = steps[0][1]  # every step has the same batch shape
        world = self.trainer.env.world_size
        return {
            "tokens_per_s": tokens / median_s,
            "tokens_per_s_per_gpu": tokens / median_s / world,
            "median_step_s": median_s,
            "step_seconds": [round(s, 5) for s, _ in steps],  # in the order they ran
            "spread": (_quantile(seconds, 0.9) - _quantile(seconds, 0.1)) / median_s,  # p90 - p10, of the median
            "steps": n,
        }

    def measured_step(self) -> dict:
        """One step with its peak memory: resident bytes before it plus the most it
        allocated on top (see module docstring)."""
        device = self.trainer.env.device
        resident = resident_bytes(self.trainer) if device.type != "cuda" else torch.cuda.memory_allocated(device)
        peak_extra, metrics = peak_during(self.run_step, device)
        # On a GPU out-of-memory happens at the allocator's reserved level, not the allocated
        # one: its peak over the same step (peak_during resets both) is recorded beside it.
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        return {
            "resident_bytes": resident,
            "peak_bytes": resident + peak_extra,
            "reserved_peak_bytes": reserved,
            **_json_safe(metrics),
        }


def run_specs(measure: Callable[[dict, DistEnv], tuple[dict, object]], name: str) -> None:
    """A benchmark worker's main (``python -m torch.distributed.run ... worker.py specs.json``):
    one process group, each spec of the JSON list in argv[1] measured in turn; every rank
    writes its records to <first spec's output.dir>/<name>-rank<R>.json."""
    import json
    import sys
    from pathlib import Path

    from wlora_dist.distributed.env import init_distributed, shutdown
    from wlora_dist.training.tracking import setup_logging

    specs = json.loads(Path(sys.argv[1]).read_text())
    env = init_distributed(specs[0]["cfg"]["distributed"].get("timeout_minutes", 10))
    setup_logging(env.is_main)
    done = [measure(spec, env) for spec in specs]
    out = Path(specs[0]["cfg"]["output"]["dir"]) / f"{name}-rank{env.global_rank}.json"
    out.write_text(json.dumps([record for record, _ in done]))
    shutdown()
    exit_now(done)  # the trainers outlive the group: see tests/dist_worker.py


@contextlib.contextmanager
def fake_world(world_size: int, backend: str = "replicated") -> Iterator[None]:
    """Rank 0 of ``world_size`` alone in this process (torch's fake process group: every
    shard, buffer and activation has its real size, collectives do nothing). At world size
    1, FSDP2 and ZeRO get a real one-rank group (nccl on a GPU) instead, so what is timed
    is the real collective path."""
    import torch.distributed as dist

    if world_size == 1 and backend == "replicated":
        yield
        return
    if world_size == 1:
        import os

        for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(var, value)  # DeepSpeed asserts the launcher's variables
        store = dist.HashStore()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=0, world_size=1)
    else:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def kept_layer_kinds(h: Harness) -> list[tuple[int, str]]:
    """(decoder layer, module kind) of the adapters a run keeps, as the planner names them."""
    return [(s.layer, s.kind) for s in h.trainer.wl.kept_sites() if s.layer is not None]


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _json_safe(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str))}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def resident_bytes(tr: Trainer) -> int:
    """Bytes this rank holds between steps: model parameters (local shards) and buffers,
    optimizer state, the gates; each storage counted once."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if t is None or t.device.type == "meta":
            return
        t = _local(t)
        st = t.untyped_storage()
        if st.nbytes():
            seen[st.data_ptr()] = st.nbytes()

    module = tr.wl.peft_model
    for p in module.parameters():
        add(p)
        add(p.grad)
    for b in module.buffers():
        add(b)
    for v in tr.backend.optimizer_state_tensors():
        add(v)
    add(tr.wl.gates)
    return sum(seen.values())


def peak_during(fn: Callable[[], dict], device: torch.device) -> tuple[int, dict]:
    """(the most bytes allocated on top of what was allocated before ``fn``, its result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    run = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            run += e.nbytes()
            peak = max(peak, run)
    return peak, out
