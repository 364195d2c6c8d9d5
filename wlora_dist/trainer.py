"""The training recipe: setup -> train (selection phase -> prune event -> LoRA on K) ->
export -> cleanup.

    torchrun --nproc_per_node 2 train.py --config configs/tiny_cpu.yaml
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml train.py --config configs/tiny_cpu.yaml
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

from . import checkpoint
from . import data as data_mod
from .backends import Backend, base_bytes_by_dtype, make_backend
from .config import ConfigError, RunConfig
from .distributed import (
    DistEnv,
    all_reduce_mean_,
    all_reduce_sum_,
    assert_same_on_all_ranks,
    barrier,
    gather_objects,
)
from .errors import UserError
from .export import lora_config_to_json, save_peft_adapter
from .extension import double_rank
from .modeling import load_tokenizer
from .report import write_report
from .selection import (
    gate_step,
    in_selection,
    is_projection_step,
    is_prune_step,
    lr_multiplier,
    round_index,
    round_k,
)
from .tracking import RunLogger, log
from .weight_lora import WeightLoRA


class TrainingError(UserError):
    """The run cannot go on (NaN loss, an adapter in the way)."""


@dataclass
class TrainResult:
    adapter_dir: Path
    report_dir: Path
    kept: list[str]
    history: list[dict] = field(default_factory=list)  # rank-0 metrics of every step
    eval_loss: float | None = None
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # "before"/"after" prune
    stopped_at: int | None = None  # the step a stop signal ended the run at (checkpoint saved)
    checkpoint: Path | None = None


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.out_dir = Path(cfg.output.dir)
        self.adapter_dir = self.out_dir / "adapter"
        self.report_dir = self.out_dir / "report"
        self.removed_refs: list[weakref.ref] = []  # removed adapter tensors (tests prove them freed)
        self.memory: dict[str, dict[str, int]] = {}
        self.prune_seconds: float | None = None
        self.prune_losses: tuple[float, float] | None = None  # probe loss before / after removal
        self.rounds_log: list[dict] = []  # WeightLoRA+: kept set and rank after each round
        self.local_losses: list[float] = []  # this rank's own loss per step, before the all-reduce
        self.write_reports = True  # selection reports at the prune event / rounds (rank 0)
        self.replanned: dict | None = None  # memory.replan_at_prune's switch, if it made one

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        if self.adapter_dir.exists() and not cfg.output.overwrite:
            raise TrainingError(
                f"{self.adapter_dir} already holds an adapter; choose another output.dir or set "
                "output.overwrite=true (the old one is replaced only after the new one is complete)"
            )
        set_seed(cfg.train.seed)  # the same on every rank: identical adapter init
        self.tokenizer = load_tokenizer(cfg.model)
        self._setup_data()  # before the (possibly long) model load: bad data fails in seconds
        self.backend: Backend = make_backend(cfg, env)
        self.setup_model(self.backend.load_base(cfg.model))
        self.logger = RunLogger(cfg.log, self.out_dir / "logs", cfg.train.max_steps, env.is_main, cfg.to_dict())
        self._log_plan()
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"
        self.start_step = 0
        resume = checkpoint.resolve_resume(cfg.checkpoint.resume_from, self.ckpt_root)
        if resume is not None:
            self._resume(resume)
        # Data position: rows of the global batch already consumed -> this rank's micro-batches.
        consumed = self.start_step * cfg.train.grad_accum_steps
        self.train_iter = data_mod.forever(self.train_loader, start=consumed)
        self.stopper = checkpoint.StopOnSignal()
        if cfg.checkpoint.save_on_signal:
            self.stopper.install()
        self.logger.info(
            "world_size=%d backend=%s adapters n=%d (%s) trainable=%d params selection=%s K=%s T=%d",
            env.world_size,
            self.backend.name,
            self.wl.n,
            ",".join(cfg.adapter.target_modules),
            sum(getattr(p, "ds_numel", p.numel()) for p in self.params),  # ZeRO-3: numel() is 0
            cfg.selection.method,
            cfg.selection.k if cfg.selection.method == "topk" else "-",
            cfg.selection.steps,
        )

    def setup_model(self, base: torch.nn.Module, before_wrap: Callable[[WeightLoRA], None] | None = None) -> None:
        """Adapters, gates, backend wrapping and optimizer on ``base`` (the backend's
        ``load_base``; benchmarks pass a random-init model here, and ``before_wrap`` to
        turn it into plain peft LoRA for their baselines)."""
        cfg, env = self.cfg, self.env
        self.pruned = False
        self.wl = WeightLoRA.attach(base, cfg.adapter)
        if cfg.train.loss_shards:
            from .loss import tiled_causal_lm_loss

            self.wl.base_model.loss_function = tiled_causal_lm_loss(cfg.train.loss_shards)
        if not any(p.is_meta for p in self.wl.trainable_parameters()):
            self.wl.init_adapters(cfg.train.seed)  # meta models get the same init in prepare()
        if cfg.selection.method == "topk" and cfg.selection.k > self.wl.n:
            raise ConfigError(
                [
                    f"selection.k: {cfg.selection.k} exceeds the {self.wl.n} adapters that adapter.target_modules / "
                    f"adapter.layers give on this model; choose k in [1, {self.wl.n}]"
                ],
                "selection",
            )
        if cfg.selection.rounds:
            self._check_rounds_fit()
        if cfg.memory.replan_at_prune and not self._memory_budget_gib():
            raise ConfigError(
                ["memory.replan_at_prune: true needs memory.budget_gib on a machine without a GPU (GiB per rank)"],
                "memory",
            )
        if before_wrap is not None:
            before_wrap(self.wl)
        self.backend.prepare(self.wl)
        self.params = self.wl.trainable_parameters()  # after wrapping: DTensors under FSDP2
        self.wl.gates.data = self.wl.gates.data.to(env.device)
        self.backend.build_optimizer(self.params)
        torch.manual_seed(cfg.train.seed + env.global_rank)  # dropout differs per rank, as in DDP

    def _setup_data(self) -> None:
        cfg, env = self.cfg, self.env
        train_rows, eval_rows = data_mod.train_eval_split(cfg.data, cfg.train.seed)
        train_ds = data_mod.tokenize(train_rows, self.tokenizer, cfg.data)
        pad = self.tokenizer.pad_token_id
        mb = cfg.train.micro_batch_size
        self.train_loader = data_mod.make_loader(
            train_ds, mb, pad, env.global_rank, env.world_size, cfg.train.seed, True
        )
        self.eval_loader = None
        if eval_rows is not None:
            eval_ds = data_mod.tokenize(eval_rows, self.tokenizer, cfg.data)
            if len(eval_ds) >= env.world_size * mb:
                self.eval_loader = data_mod.make_loader(eval_ds, mb, pad, env.global_rank, env.world_size, 0, False)
            else:
                log.warning("eval data has %d rows, fewer than one batch per rank: no eval", len(eval_ds))

    # ------------------------------------------------------------------ train

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.env.device.type == "cuda" and self.cfg.train.mixed_precision in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self) -> TrainResult:
        cfg = self.cfg
        history = []
        self.backend.module.train()
        every = cfg.checkpoint.every
        for step in range(self.start_step + 1, cfg.train.max_steps + 1):
            metrics = self._optimizer_step(step)
            if is_prune_step(step, cfg.selection):
                metrics["prune_seconds"] = self._prune_event(step)
            elif round_index(step, cfg.selection):
                metrics["round_seconds"] = self._round_event(step, round_index(step, cfg.selection))
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                metrics.update(self._eval_metrics())
            history.append(metrics)
            self.logger.step(
                step,
                metrics,
                {
                    "loss": f"{metrics['loss']:.3f}",
                    "lr": f"{metrics['lr']:.2e}",
                    "tok/s": f"{metrics['tokens_per_s']:.0f}",
                    "kept": f"{metrics['kept']}/{self.wl.n}",
                },
            )
            stop = self.stopper.requested(self.env.device)  # on every rank, whichever got the signal
            if stop or (every and step % every == 0 and step < cfg.train.max_steps):
                path = self.save_checkpoint(step)
            if stop:
                self.logger.info(
                    "stop signal received: checkpoint of step %d in %s; resume with checkpoint.resume_from=auto",
                    step,
                    path,
                )
                return TrainResult(
                    self.adapter_dir,
                    self.report_dir,
                    [s.name for s in self.wl.kept_sites()],
                    history,
                    memory=self.memory,
                    stopped_at=step,
                    checkpoint=path,
                )
        final_eval = self._eval_metrics()
        if final_eval:
            self.logger.track(cfg.train.max_steps, final_eval)
            self.logger.info("final eval: loss %.4f perplexity %.2f", final_eval["eval_loss"], final_eval["eval_ppl"])
        self._save_outputs()
        return TrainResult(
            self.adapter_dir,
            self.report_dir,
            [s.name for s in self.wl.kept_sites()],
            history,
            final_eval.get("eval_loss"),
            self.memory,
        )

    def _optimizer_step(self, step: int) -> dict:
        cfg, wl = self.cfg, self.wl
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.env.device)
        tokens = 0
        accum = cfg.train.grad_accum_steps
        for micro in range(accum):
            batch = {k: v.to(self.env.device) for k, v in next(self.train_iter).items()}
            with self._autocast():
                loss = self.backend.module(**batch).loss
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss.item()} at optimizer step {step} on rank {self.env.global_rank}; "
                    "lower optim.lr / selection.lr_w or check the data"
                )
            self.backend.backward(loss / accum, last_micro_step=micro == accum - 1)
            self._last_batch = batch
            loss_sum += loss.detach()
            tokens += int(batch["attention_mask"].sum())
        self.backend.reduce_gradients(self.params)
        selecting = in_selection(step, cfg.selection)
        if selecting:
            assert wl.gates.grad is not None
            all_reduce_mean_(wl.gates.grad)  # w is replicated: mean grad, same step on every rank
        mult = lr_multiplier(step, cfg.optim, cfg.train.max_steps)
        grad_norm = self.backend.step(self.params, cfg.optim.lr * mult, cfg.optim.max_grad_norm)
        if step in (cfg.selection.steps, cfg.selection.steps + 1) and cfg.selection.method != "none":
            self.memory["before" if step == cfg.selection.steps else "after"] = self.backend.memory_report(self.params)
        self.backend.zero_grad()
        metrics = {"gate_grad_norm": 0.0}
        if selecting:
            metrics = self._gate_update(step, cfg.selection.lr_w * mult)
        self.local_losses.append(float(loss_sum / accum))
        loss_mean = all_reduce_mean_(loss_sum / accum).item()
        elapsed = time.perf_counter() - t0
        return {
            "loss": loss_mean,
            "lr": cfg.optim.lr * mult,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens * self.env.world_size / elapsed,
            "kept": int(wl.kept.sum()),
            "step_seconds": elapsed,
            **metrics,
        }

    def _gate_update(self, step: int, lr_w: float) -> dict:
        wl, sel = self.wl, self.cfg.selection
        assert wl.gates.grad is not None
        round_ = round_index(step, sel)
        result = gate_step(
            wl.gates,
            wl.gates.grad,
            lr_w,
            sel,
            is_projection_step(step, sel),
            force_projection=is_prune_step(step, sel) or round_ > 0,
            k=round_k(wl.n, round_) if round_ else None,
        )
        with torch.no_grad():
            wl.gates.copy_(result.gates)
        wl.gates.grad = None
        if result.projected:
            assert_same_on_all_ranks(wl.gates, "gate vector w")  # cheap: n floats
        return {"gate_grad_norm": result.grad_norm, "gates_nonzero": int((wl.gates != 0).sum())}

    # ------------------------------------------------------------------ prune event

    def _prune_event(self, step: int) -> float:
        """Freeze w, physically remove adapters with w_i == 0, rebuild the optimizer."""
        t0 = time.perf_counter()
        wl, sel = self.wl, self.cfg.selection
        assert_same_on_all_ranks(wl.gates, "gate vector w at the prune event")
        drop = [s.index for s in wl.kept_sites() if float(wl.gates.detach()[s.index]) == 0.0]
        loss_before = self._probe_loss()
        if sel.fold_gates:
            wl.fold_gates_into_B()
        wl.freeze_gates()
        removed = wl.remove(drop)
        self.pruned = True
        if sel.rounds:  # WeightLoRA+: the last round doubles the kept ranks too
            removed += self._extend_kept(sel.rounds)
        if sel.reinit_kept:
            # A different seed from the first init; identical on every rank.
            wl.reinit_kept(self.cfg.train.seed + 1, self.backend.assign_full)
        self.params = wl.trainable_parameters()
        # Adam state is carried over for kept adapters, reset where they were re-initialised
        # or extended (WeightLoRA+).
        self.backend.rebuild_after_prune(self.params, keep_state=not (sel.reinit_kept or sel.rounds))
        self.removed_refs = [weakref.ref(p) for p in removed]
        del removed
        if self.cfg.memory.replan_at_prune:
            self._replan()
        # Continuity: the pruned model computes what the gated model did (unless reinit).
        self.prune_losses = (loss_before, self._probe_loss())
        seconds = time.perf_counter() - t0
        self.prune_seconds = seconds
        if sel.rounds:
            self._record_round(sel.rounds, step, seconds, self.prune_losses)
        if self.env.is_main and self.write_reports:
            write_report(
                wl,
                self.report_dir,
                step,
                "prune",
                {
                    "prune_seconds": seconds,
                    "probe_loss_before": loss_before,
                    "probe_loss_after": self.prune_losses[1],
                    "rounds": self.rounds_log,
                },
            )
        self.logger.info(
            "prune event at step %d: kept %d of %d adapters, removed %d, %.3f s; report in %s",
            step,
            int(wl.kept.sum()),
            wl.n,
            len(drop),
            seconds,
            self.report_dir,
        )
        return seconds

    def _memory_budget_gib(self) -> float:
        if self.cfg.memory.budget_gib:
            return self.cfg.memory.budget_gib
        if self.env.device.type == "cuda":
            return torch.cuda.get_device_properties(self.env.device).total_memory / 2**30
        return 0.0

    def _plan_input(self, kept: list[tuple[int, str]] | None):
        """This run's memory-plan input at the budget (None: no budget on a CPU run, or a
        model config the planner does not know)."""
        from dataclasses import replace

        from .memory_plan import ModelShape, run_plan_input

        budget = self._memory_budget_gib()
        if not budget:
            return None
        try:
            shape = ModelShape.from_hf_config(self.wl.base_model.config.to_dict())
        except (KeyError, TypeError):  # not a Llama-like config: nothing to say
            return None
        on_gpu = self.env.device.type == "cuda"
        inp = run_plan_input(self.cfg, shape, self.env.world_size, on_gpu, kept, self.backend.name)
        return replace(inp, gpu_gib=budget)

    def _log_plan(self) -> None:
        """The planner's per-rank peak for this run, against the budget (the GPU's memory or
        memory.budget_gib), before the first step: an OOM foretold is cheaper than one met."""
        from .memory_plan import human, plan, recommend

        inp = self._plan_input(None)
        if inp is None:
            return
        p = plan(inp)
        self.logger.info(
            "memory plan per rank: %s in the selection phase, %s after the prune event, of %s "
            "(wlora-dist plan --config ... for the breakdown)",
            human(p.before.total),
            human(p.after.total),
            human(p.budget),
        )
        if not (p.fits_before and p.fits_after):
            recs = recommend(p.inp)
            hint = f"; settings that fit: {recs[0][0]}" if recs else ""
            log.warning("the memory plan says this run does not fit %s per rank%s", human(p.budget), hint)

    def _replan(self) -> None:
        """memory.replan_at_prune: with K adapters left, switch activation checkpointing
        off when the plan says the rest of the run fits the budget without it, else keep
        it on the fewest layers that fit. The same math (checkpointing only recomputes), a
        faster step; the global batch unchanged."""
        if not self.cfg.model.gradient_checkpointing:
            return
        from dataclasses import replace

        from .memory_plan import GiB, human, plan, replan_after_prune
        from .modeling import enable_checkpointing

        kept = [(s.layer, s.kind) for s in self.wl.kept_sites() if s.layer is not None]
        inp = self._plan_input(kept)
        if inp is None:
            self.logger.info("re-plan at the prune event: the planner does not know this model; nothing changed")
            return
        switched = replan_after_prune(inp)
        budget = inp.gpu_gib - inp.reserve_gib
        if switched is None:
            self.logger.info(
                "re-plan at the prune event: %d adapters need %s per rank without activation checkpointing, and "
                "checkpointing fewer layers does not fit the %.1f GiB budget either: it stays as it is",
                len(kept),
                human(plan(replace(inp, activation_checkpointing=False)).after.total),
                budget,
            )
            return
        planned = plan(switched).after.total
        if not switched.activation_checkpointing:
            self.wl.base_model.activation_checkpointing_disable()
            # transformers made the embedding output require grad for checkpointing, so every
            # layer upstream of the first adapter built a graph; without checkpointing none is needed.
            self.wl.base_model.disable_input_require_grads()
            what = "activation checkpointing switched off"
        else:
            enable_checkpointing(self.wl.base_model, switched.checkpoint_every)
            what = f"activation checkpointing of every {switched.checkpoint_every}th layer only"
        self.replanned = {
            "activation_checkpointing": switched.activation_checkpointing,
            "checkpoint_every_n_layers": switched.checkpoint_every,
            "planned_gib": planned / GiB,
            "budget_gib": budget,
        }
        self.logger.info(
            "re-plan at the prune event: %d adapters fit %s per rank (of %.1f GiB) with %s for the rest of the run",
            len(kept),
            human(planned),
            budget,
            what,
        )

    # ------------------------------------------------------------------ WeightLoRA+ rounds

    def _check_rounds_fit(self) -> None:
        sel, r = self.cfg.selection, self.cfg.adapter.lora_rank
        final = r << sel.rounds
        narrow = [s.name for s in self.wl.sites if self.wl.lora_layer(s).in_features < final]
        problems = []
        if self.wl.n >> sel.rounds < 1:
            problems.append(f"selection.rounds: {sel.rounds} halvings of n={self.wl.n} adapters leave none")
        if narrow:
            problems.append(
                f"selection.rounds: {sel.rounds} doublings of adapter.lora_rank={r} reach rank {final}, more than "
                f"the {len(narrow)} adapter(s) with fewer inputs can hold (e.g. {narrow[0]}); lower one of them"
            )
        if problems:
            raise ConfigError(problems, "selection")

    def _extend_kept(self, round_: int) -> list[torch.nn.Parameter]:
        """Double the rank of every kept adapter (selection.extension), the same values on
        every rank: gathered, extended in full with a generator seeded by (seed, adapter,
        round), written into new modules the backend then shards. Returns the old params."""
        wl, sel = self.wl, self.cfg.selection
        sites = wl.kept_sites()
        old: list[torch.nn.Parameter] = []
        for site in sites:
            a, b = (t.detach() for t in self.backend.gather_full(wl.adapter_params(site)))
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + site.index + 7_919 * round_)
            a2, b2 = double_rank(a, b, sel.extension, gen)
            old += wl.replace_adapter(site, a2.to(self.env.device), b2.to(self.env.device))
        self.backend.adapters_replaced(wl, sites)
        return old

    def _round_event(self, step: int, round_: int) -> float:
        """A WeightLoRA+ round before the last: the projection kept the best n/2^round;
        remove the others, double the kept ranks, rebuild; the gates keep training."""
        t0 = time.perf_counter()
        wl = self.wl
        assert_same_on_all_ranks(wl.gates, f"gate vector w at WeightLoRA+ round {round_}")
        drop = [s.index for s in wl.kept_sites() if float(wl.gates.detach()[s.index]) == 0.0]
        loss_before = self._probe_loss()
        removed = wl.remove(drop)
        removed += self._extend_kept(round_)
        self.params = wl.trainable_parameters()
        self.backend.rebuild_after_prune(self.params, keep_state=False)  # extended: fresh Adam state
        self.removed_refs = [weakref.ref(p) for p in removed]
        del removed
        losses = (loss_before, self._probe_loss())
        seconds = time.perf_counter() - t0
        self._record_round(round_, step, seconds, losses)
        if self.env.is_main and self.write_reports:
            write_report(wl, self.report_dir, step, f"round{round_}", {"rounds": self.rounds_log})
        self.logger.info(
            "WeightLoRA+ round %d at step %d: kept %d of %d adapters at rank %d, %.3f s (probe loss %.5f -> %.5f)",
            round_,
            step,
            int(wl.kept.sum()),
            wl.n,
            self.rounds_log[-1]["rank"],
            seconds,
            *losses,
        )
        return seconds

    def _record_round(self, round_: int, step: int, seconds: float, losses: tuple[float, float] | None) -> None:
        kept = self.wl.kept_sites()
        self.rounds_log.append(
            {
                "round": round_,
                "step": step,
                "k": len(kept),
                "rank": self.wl.lora_rank(kept[0]) if kept else 0,
                "kept": [s.name for s in kept],
                "seconds": seconds,
                "probe_loss_before": losses[0] if losses else None,
                "probe_loss_after": losses[1] if losses else None,
            }
        )

    # ------------------------------------------------------------------ checkpoints

    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        """Kept adapters' A and B by a name independent of backend and world size."""
        out = {}
        for s in self.wl.kept_sites():
            a, b = self.wl.adapter_params(s)
            out[f"{s.name}.lora_A"], out[f"{s.name}.lora_B"] = a, b
        return out

    def _identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it."""
        cfg, mc = self.cfg, self.wl.base_model.config
        return {
            "model": {k: getattr(mc, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers")},
            "sites": [s.name for s in self.wl.sites],
            "adapter.lora_rank": cfg.adapter.lora_rank,
            "adapter.lora_alpha": cfg.adapter.lora_alpha,
            "selection.method": cfg.selection.method,
            "selection.k": cfg.selection.k,
            "selection.steps": cfg.selection.steps,
            "selection.fold_gates": cfg.selection.fold_gates,
            "train.seed": cfg.train.seed,
        }

    def save_checkpoint(self, step: int) -> Path:
        """Collective: every rank writes its shards; one folder, complete or absent."""
        t0 = time.perf_counter()
        cfg, env = self.cfg, self.env
        tensors = self.backend.checkpoint_tensors(self._named_params(), for_load=False)
        tensors["wlora.gates"] = self.wl.gates.detach()
        meta = {
            "step": step,
            "pruned": self.pruned,
            "kept": [s.name for s in self.wl.kept_sites()],
            "ranks": {s.name: self.wl.lora_rank(s) for s in self.wl.kept_sites()},
            "rounds_log": self.rounds_log,
            "rows_consumed": step * cfg.train.grad_accum_steps * cfg.train.micro_batch_size * env.world_size,
            "world_size": env.world_size,
            "backend": self.backend.name,
            "identity": self._identity(),
            "adapter_config": lora_config_to_json(self.wl.export_config(cfg.model.path)),
            "time": time.time(),
        }
        path = checkpoint.save(self.ckpt_root, step, tensors, meta, cfg.to_dict(), env, cfg.checkpoint.keep_last)
        self.logger.info("checkpoint of step %d -> %s (%.2f s)", step, path, time.perf_counter() - t0)
        return path

    def _resume(self, path: Path) -> None:
        """Bring this freshly set-up run to the checkpoint's state: remove the adapters it had
        removed, then load adapters, AdamW state, gates (resharded to this world size and
        backend), the step, the data position and this rank's RNG."""
        cfg, env, wl = self.cfg, self.env, self.wl
        meta = checkpoint.read_meta(path)
        checkpoint.check_compatible(meta, self._identity(), path)
        kept = set(meta["kept"])
        drop = [s.index for s in wl.sites if s.name not in kept]
        ranks = meta.get("ranks", {})
        grow = [s for s in wl.sites if s.name in kept and ranks.get(s.name, wl.lora_rank(s)) != wl.lora_rank(s)]
        if meta["pruned"]:
            wl.freeze_gates()
            self.pruned = True
        if drop or grow:
            wl.remove(drop)
            for s in grow:  # WeightLoRA+ ranks: empty modules of the saved rank, filled below
                a, b = wl.adapter_params(s)
                r, shape_a, shape_b = ranks[s.name], getattr(a, "ds_shape", a.shape), getattr(b, "ds_shape", b.shape)
                zeros_a = torch.zeros(r, shape_a[1], device=env.device)
                wl.replace_adapter(s, zeros_a, torch.zeros(shape_b[0], r, device=env.device))
            if grow:
                self.backend.adapters_replaced(wl, grow)
            self.params = wl.trainable_parameters()
            self.backend.rebuild_after_prune(self.params, keep_state=False)
        if self.pruned and cfg.memory.replan_at_prune:
            self._replan()  # the same decision the interrupted run made at its prune event
        self.rounds_log = list(meta.get("rounds_log", []))
        named = self._named_params()
        tensors = self.backend.checkpoint_tensors(named, for_load=True)
        tensors["wlora.gates"] = wl.gates.detach()
        checkpoint.load_tensors(path, tensors, env.distributed)
        self.backend.load_checkpoint_tensors(named, tensors)
        self.start_step = int(meta["step"])
        same_layout = meta["world_size"] == env.world_size
        rows_per_step = cfg.train.grad_accum_steps * cfg.train.micro_batch_size * env.world_size
        if meta["rows_consumed"] != self.start_step * rows_per_step:
            log.warning(
                "resuming with a different global batch (%d rows per step; the checkpoint's run used %d)",
                rows_per_step,
                meta["rows_consumed"] // max(1, self.start_step),
            )
        used = checkpoint.restore_rng(path, env.global_rank, cfg.train.seed + env.global_rank + 7919 * self.start_step)
        self.logger.info(
            "resumed from %s: step %d, %s, %d of %d adapters kept%s",
            path,
            self.start_step,
            "after the prune event" if self.pruned else "selection phase",
            int(wl.kept.sum()),
            wl.n,
            ""
            if same_layout and used
            else f" (world size {meta['world_size']} -> {env.world_size}: data order and "
            "dropout RNG re-derived, the run is close to, not bitwise, the uninterrupted one)",
        )

    # ------------------------------------------------------------------ eval / save

    @torch.no_grad()
    def _probe_loss(self) -> float:
        """Loss of the last training micro-batch, dropout off (same batch before/after pruning)."""
        self.backend.module.eval()
        with self._autocast():
            loss = self.backend.module(**self._last_batch).loss
        self.backend.module.train()
        return float(loss)

    @torch.no_grad()
    def _eval_metrics(self) -> dict:
        if self.eval_loader is None:
            return {}
        self.backend.module.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # (loss * tokens, tokens)
        for i, batch in enumerate(self.eval_loader):
            if i >= self.cfg.train.eval_batches:
                break
            batch = {k: v.to(self.env.device) for k, v in batch.items()}
            with self._autocast():
                loss = self.backend.module(**batch).loss
            n = int((batch["labels"][:, 1:] != data_mod.IGNORE).sum())
            sums += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=sums.device)
        all_reduce_sum_(sums)
        self.backend.module.train()
        eval_loss = float(sums[0] / sums[1].clamp(min=1))
        return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}

    def _save_outputs(self) -> None:
        state = self.wl.export_state(self.backend.gather_full)
        # Every rank's bytes before/after the prune event and its wall time, in one report.
        per_rank = gather_objects(
            {
                "global_rank": self.env.global_rank,
                **self.memory,
                "base_bytes": base_bytes_by_dtype(self.wl.peft_model),
                "prune_seconds": self.prune_seconds,
            }
        )
        if self.env.is_main:
            extra = {
                "backend": self.backend.name,
                "world_size": self.env.world_size,
                "memory_per_rank": per_rank,
                "rounds": self.rounds_log,
            }
            write_report(self.wl, self.report_dir, self.cfg.train.max_steps, "final", extra)
            for r in per_rank:
                self.logger.info(
                    "rank %d: frozen base %s",
                    r["global_rank"],
                    ", ".join(f"{v / 2**20:.2f} MiB {k}" for k, v in sorted(r["base_bytes"].items())),
                )
                if "before" in r and "after" in r:
                    self.logger.info(
                        "rank %d: trainable/optimizer bytes %s -> %s, prune %.3f s",
                        r["global_rank"],
                        _bytes_summary(r["before"]),
                        _bytes_summary(r["after"]),
                        r["prune_seconds"],
                    )
            save_peft_adapter(state, self.wl, self.adapter_dir, self.cfg.model.path)
            self.logger.info("adapter (peft format) -> %s ; selection report -> %s", self.adapter_dir, self.report_dir)
        barrier()

    def cleanup(self) -> None:
        if hasattr(self, "stopper"):
            self.stopper.uninstall()
        if hasattr(self, "logger"):
            self.logger.close()


def _bytes_summary(mem: dict[str, int]) -> str:
    return f"{mem.get('trainable_param_bytes', 0)}/{mem.get('optimizer_state_bytes', 0)}"
