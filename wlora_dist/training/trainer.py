"""The training loop: setup -> train (selection phase -> prune event -> LoRA on K) -> export
-> cleanup. The method lives in method/ (the ``Selector``), the distribution in
distributed/ (a ``Backend``); this module only runs them in order.

    torchrun --nproc_per_node 2 train.py --config configs/tiny_cpu.yaml
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml train.py --config configs/tiny_cpu.yaml
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import set_seed

from wlora_dist.config import ConfigError, RunConfig
from wlora_dist.data import pipeline as data_mod
from wlora_dist.distributed.base import Backend, WeightsSource
from wlora_dist.distributed.env import REPLICA_SYNC, DistEnv, all_reduce_mean_
from wlora_dist.distributed.registry import make_backend
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.method.init import derive_seed
from wlora_dist.method.schedule import run_lr_multiplier
from wlora_dist.method.selector import LayoutChange, LayoutEvent, Selector, fit_problems
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.blocks import compile_decoder_layers
from wlora_dist.model.loading import load_tokenizer
from wlora_dist.resolved import ResolvedRun, resolve_run
from wlora_dist.training import evaluation, replan, run_checkpoint, saves
from wlora_dist.training.callbacks import Callback
from wlora_dist.training.outputs import check_output_free, save_outputs
from wlora_dist.training.report import report_layout_change, round_record
from wlora_dist.training.results import TrainingError, TrainResult
from wlora_dist.training.tracking import RunLogger

Batch = dict[str, torch.Tensor]
log = logging.getLogger("wlora_dist")


class Trainer:
    def __init__(
        self,
        run: ResolvedRun | RunConfig,
        env: DistEnv,
        callbacks: Sequence[Callback] = (),
        handle_signals: bool = False,
    ) -> None:
        """``run``: the resolved run (the command line resolves it once, for the preflight
        checks and this), or a config to resolve here. ``handle_signals``: SIGTERM /
        SIGUSR1 / SIGINT request a checkpoint and a stop (checkpoint.save_on_signal) from
        setup() until cleanup(), which restores the handlers there were. Off unless asked:
        the command line asks; a program that runs a Trainer inside itself (a notebook, a
        test runner) keeps its own Ctrl-C."""
        self.run = run if isinstance(run, ResolvedRun) else resolve_run(run)
        self.env, self.callbacks = env, list(callbacks)
        self.handle_signals = handle_signals
        self.memory: dict[str, dict[str, int]] = {}  # trainable / optimizer bytes before / after the prune
        self.outcome = "failed"  # what the trackers are told at cleanup: finished / stopped / failed
        self.steps_per_epoch: int | None = None  # optimizer steps in one pass over data.train (None: batches given)
        self.layout_events: list[LayoutEvent] = []  # rounds, the prune event, a resume
        self.rounds_log: list[dict] = []  # WeightLoRA+: kept set and rank after each round
        self.replanned: replan.Replan | None = None  # memory.replan_at_prune's switch, if it made one
        self.prune_seconds: float | None = None
        self.start_step = 0
        # Made by setup(), in this order (the run sized from the data first):
        self.eval_loader: DataLoader | None = None
        self.saves: saves.SaveSchedule | None = None  # when to checkpoint; the stop signals
        self.logger = RunLogger(self.cfg.log, self.run.paths.logs, 0, False, {})  # silent until the run is accepted
        self.backend: Backend  # owns the trainable parameters (backend.params) and the optimizer
        self.wl: WeightLoRA  # the model with its adapters and gates
        self.selector: Selector  # the gate update and the layout changes
        self.train_iter: Iterator[Batch]  # this rank's training micro-batches, from the data position
        self._last_batch: Batch = {}  # the last micro-batch: the probe loss around a layout change
        self._trained_tokens = 0  # tokens with a label in this step's micro-batches (this rank)

    @property
    def cfg(self) -> RunConfig:
        """The run's config (frozen; sized from the data once setup() has read them)."""
        return self.run.cfg

    @property
    def spec(self) -> BackendSpec:
        return self.run.spec

    # ------------------------------------------------------------------ setup

    def setup(
        self,
        model: nn.Module | None = None,
        weights: WeightsSource | None = None,
        batches: Iterator[Batch] | None = None,
    ) -> None:
        """Data, model, adapters, backend, logger, resume. ``model``: a base model to train
        instead of loading model.path (built on meta: filled from ``weights``); ``batches``:
        training micro-batches instead of data.* (no eval)."""
        env, paths, resume = self.env, self.run.paths, self.run.resume
        check_output_free(self.cfg, paths.adapter, paths.checkpoints, resumes=resume is not None)
        set_seed(self.cfg.train.seed)  # the same on every rank: identical adapter init
        loader = self._setup_data() if batches is None else None  # before the model load: bad data fails fast
        if not self.run.sized:
            raise ConfigError(["train.epochs / *_fraction / *_ratio size a run from its data: give data.train"])
        cfg = self.cfg  # final from here on
        self.saves = saves.SaveSchedule(cfg.checkpoint, cfg.train.max_steps)
        self.logger = RunLogger(cfg.log, paths.logs, cfg.train.max_steps, False, {})  # silent until accepted
        self.backend = make_backend(self.run, env, weights)
        if model is None:
            log.info("model: loading %s (%s)", cfg.model.path, self.spec.name)
        self._setup_model(model if model is not None else self.backend.load_base(cfg.model))
        replan.log_plan(replan.plan_input(cfg, env, self.spec, self.wl.base_model, None), self.logger)
        if resume is not None:
            self._resume(resume)
        # Accepted: only now is anything written (logs/, the trackers' config copy).
        self.logger = RunLogger(
            cfg.log,
            paths.logs,
            cfg.train.max_steps,
            env.is_main,
            cfg.to_dict(),
            self.start_step > 0,
            self.steps_per_epoch,
            self.start_step,
        )
        # Data position: rows of the global batch already consumed -> this rank's micro-batches.
        start = self.start_step * cfg.train.grad_accum_steps
        self.train_iter = data_mod.forever(loader, start) if loader is not None else batches
        if self.handle_signals and cfg.checkpoint.save_on_signal:
            self.saves.stopper.install()
        sel, n_params = cfg.selection, sum(self.backend.numel(p) for p in self.backend.params)
        kinds = ",".join(dict.fromkeys(s.kind for s in self.wl.sites))
        self.logger.info(
            f"world_size={env.world_size} backend={self.spec.name}{self._mesh_words()} adapters n={self.wl.n} "
            f"({kinds}) trainable={n_params} params selection={sel.method} "
            f"K={sel.kept(self.wl.n) if sel.method == 'topk' else '-'} T={sel.steps}"
        )
        self.logger.info(self._run_length())

    def _run_length(self) -> str:
        """The run's length as resolved (train.epochs, selection.steps_fraction and
        optim.warmup_ratio turned into step counts), said once at the start."""
        cfg = self.cfg
        t, o = cfg.train, cfg.optim
        words = f"run length: {t.max_steps} optimizer steps"
        if self.steps_per_epoch:
            words += f" ({t.max_steps / self.steps_per_epoch:.3g} epochs of {self.steps_per_epoch} steps)"
        rows = run_checkpoint.rows_per_step(cfg, self.env)
        words += f", {rows} rows per step ({t.micro_batch_size} x {t.grad_accum_steps} accumulated x "
        words += f"{self.env.world_size} ranks); selection {cfg.selection.steps} steps, warmup {o.warmup_steps} steps"
        if self.start_step:
            words += f"; resuming after step {self.start_step}"
        return words

    def _mesh_words(self) -> str:
        """' mesh=2x4 (replicas x shard group)' under HSDP; nothing otherwise."""
        replicas, shard = self.spec.mesh_shape(self.env.world_size)
        return f" mesh={replicas}x{shard} (replicas x shard group)" if self.spec.shard_size and replicas > 1 else ""

    def _setup_model(self, base: nn.Module) -> None:
        cfg, env = self.cfg, self.env
        # No KV cache in training; packed rows depend on it: transformers reads restarting
        # position ids as row boundaries only when there is no cache (masking_utils).
        base.config.use_cache = False
        self.wl = wl = WeightLoRA.attach(base, cfg.adapter)
        if cfg.train.loss_shards:
            from wlora_dist.model.loss import tiled_causal_lm_loss

            wl.base_model.loss_function = tiled_causal_lm_loss(cfg.train.loss_shards)
        if not any(p.is_meta for p in wl.trainable_parameters()):
            wl.init_adapters(cfg.train.seed)  # models on meta get the same values as they are filled
        problems = fit_problems(wl, cfg.selection, cfg.adapter.lora_rank)
        if problems:
            raise ConfigError(problems, "selection")
        if cfg.memory.replan_at_prune and not replan.memory_budget_gib(cfg, env):
            raise ConfigError(
                ["memory.replan_at_prune: true needs memory.budget_gib on a machine without a GPU (GiB per rank)"],
                "memory",
            )
        for cb in self.callbacks:
            cb.on_adapters_attached(self, wl)
        self.backend.prepare(wl)
        if cfg.train.compile:
            compile_decoder_layers(wl.base_model)
        wl.gates.data = wl.gates.data.to(env.device)
        self.selector = Selector(wl, cfg.selection, cfg.train.seed, REPLICA_SYNC)
        torch.manual_seed(derive_seed(cfg.train.seed, rank=env.global_rank))  # dropout differs per rank, as in DDP

    def _setup_data(self) -> DataLoader:
        """This rank's loaders; the run sized from them (train.epochs / selection.steps_fraction /
        optim.warmup_ratio -> step counts)."""
        cfg, env = self.cfg, self.env
        train, self.eval_loader = data_mod.build_loaders(
            cfg.data,
            cfg.train.micro_batch_size,
            cfg.train.seed,
            load_tokenizer(cfg.model),
            env.global_rank,
            env.world_size,
            self.run.paths.data_cache,
        )
        self.steps_per_epoch = len(train) // cfg.train.grad_accum_steps
        if not self.run.sized:
            self.run = self.run.sized_by(self.steps_per_epoch)
        return train

    def _resume(self, path: Path) -> None:
        meta, event = run_checkpoint.resume(path, self.cfg, self.env, self.selector, self.backend, self.logger)
        self.layout_events.append(event)
        self.rounds_log, self.start_step = list(meta.rounds_log), meta.step
        if self.selector.pruned and self.cfg.memory.replan_at_prune:
            self._replan()  # the same decision the interrupted run made at its prune event

    # ------------------------------------------------------------------ train

    def train(self) -> TrainResult:
        cfg, history = self.cfg, []
        self.backend.module.train()
        for step in range(self.start_step + 1, cfg.train.max_steps + 1):
            metrics = self.train_step(step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                metrics.update(self.evaluate())
            history.append(metrics)
            postfix = {"loss": f"{metrics['loss']:.3f}", "lr": f"{metrics['lr']:.2e}"}
            postfix.update({"tok/s": f"{metrics['tokens_per_s']:.0f}", "kept": f"{metrics['kept']}/{self.wl.n}"})
            self.logger.step(step, metrics, postfix)
            assert self.saves is not None
            stop, save = self.saves.check(step, self.env.device)  # every rank, whichever got the signal
            if save:
                path = self.save_checkpoint(step)
            if stop:
                self.logger.info(
                    "stop signal received: checkpoint of step %d in %s; resume with checkpoint.resume_from=auto",
                    step,
                    path,
                )
                self.outcome = "stopped"
                return self._result(history, stopped_at=step, checkpoint=path)
        final_eval = self.evaluate()
        if final_eval:
            self.logger.track(cfg.train.max_steps, final_eval)
            self.logger.info("final eval: loss %.4f perplexity %.2f", final_eval["eval_loss"], final_eval["eval_ppl"])
        save_outputs(
            self.wl,
            self.backend,
            self.env,
            self.logger,
            self.run.paths.adapter,
            self.run.paths.report,
            cfg.model.path,
            cfg.train.max_steps,
            {**self.memory, "prune_seconds": self.prune_seconds},
            {"rounds": self.rounds_log},
            self._card_rows(final_eval) if self.env.is_main else None,
        )
        self.logger.artifacts(self.run.paths.adapter, self.run.paths.report, cfg.train.max_steps)
        self.outcome = "finished"
        return self._result(history, eval_loss=final_eval.get("eval_loss"))

    def _card_rows(self, final_eval: dict) -> dict[str, str]:
        """The model card's record of where the adapter came from."""
        from wlora_dist.training.provenance import data_fingerprints, launcher_description

        data = self.cfg.data
        rows = {"launcher": launcher_description()}
        rows["training data"] = "<br>".join(data_fingerprints(data.train)) or "batches passed in"
        if data.eval:
            rows["eval data"] = "<br>".join(data_fingerprints(data.eval))
        if final_eval:
            rows["final eval loss"] = f"{final_eval['eval_loss']:.4f} (perplexity {final_eval['eval_ppl']:.2f})"
        return rows

    def train_step(self, step: int) -> dict:
        """Optimizer step ``step`` (1-based), then the layout change the schedule puts after it."""
        metrics = self._optimizer_step(step)
        change = self.selector.change_at(step)
        if change is not None:
            what = "prune" if change.kind == "prune" else "round"
            metrics[f"{what}_seconds"] = self._change_layout(change)
            metrics[f"{what}_layout_seconds"] = self.layout_events[-1].layout_seconds
            # The state after the event (trackers' summaries keep the last value logged).
            metrics["kept"] = int(self.wl.kept.sum())
            metrics["gates_nonzero"] = int((self.wl.gates != 0).sum())
        return metrics

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.env.device.type == "cuda" and self.cfg.train.mixed_precision in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _optimizer_step(self, step: int) -> dict:
        """One optimizer step, in this order: the micro-batches (forward, backward) -> the
        adapters' gradients reduced over ranks -> the gates' gradient reduced -> clip and
        the optimizer step -> the one host sync (losses and norm, checked finite) -> the
        gates' step and projection -> the metrics to log."""
        cfg = self.cfg
        t0 = time.perf_counter()
        loss, tokens = self._micro_batches()
        self.backend.reduce_gradients()
        mult = run_lr_multiplier(step, cfg.optim, cfg.selection, cfg.train.max_steps)
        gates_train = self.selector.trains_gates(step)
        gate_grad = self.selector.reduce_gate_grad() if gates_train else None
        gate_norm = self._gate_norm_to_clip(gate_grad)
        grad_norm = self.backend.step(cfg.optim.lr * mult, cfg.optim.max_grad_norm, gate_norm)
        local_loss, mean_loss, norm = self._host_sync(step, loss, grad_norm)
        self._record_memory(step)
        for cb in self.callbacks:
            cb.on_optimizer_step_end(self, step)
        self.backend.zero_grad()
        metrics: dict = {}  # gates frozen (after the prune event): no gate metrics
        if gates_train:
            clip = (cfg.optim.max_grad_norm, grad_norm) if gate_norm is not None else None
            metrics = self.selector.update_gates(step, cfg.selection.lr_w * mult, clip)
        elapsed = time.perf_counter() - t0
        return {
            "loss": mean_loss,
            "local_loss": local_loss,
            "lr": cfg.optim.lr * mult,
            "grad_norm": norm,
            "tokens_per_s": tokens * self.env.world_size / elapsed,
            "kept": int(self.wl.kept.sum()),
            "step_seconds": elapsed,
            **metrics,
        }

    def _micro_batches(self) -> tuple[torch.Tensor, int]:
        """Forward and backward of the step's micro-batches: (their mean loss on this rank,
        kept on the device; the tokens they held)."""
        env, accum = self.env, self.cfg.train.grad_accum_steps
        loss_sum, tokens = torch.zeros((), device=env.device), 0
        self._trained_tokens = 0
        for micro in range(accum):
            cpu_batch = next(self.train_iter)
            tokens += data_mod.count_tokens(cpu_batch)  # counted on the host copy: no device sync
            self._trained_tokens += data_mod.count_trained(cpu_batch)
            self._last_batch = {k: v.to(env.device) for k, v in data_mod.model_inputs(cpu_batch).items()}
            with self._autocast():
                loss = self.backend.module(**self._last_batch).loss
            self.backend.backward(loss / accum, last_micro_step=micro == accum - 1)
            loss_sum += loss.detach()
        return loss_sum / accum, tokens

    def _gate_norm_to_clip(self, gate_grad: torch.Tensor | None) -> torch.Tensor | None:
        """The gates' gradient norm where selection.clip_gates clips them with the adapters."""
        cfg = self.cfg
        if gate_grad is None or not cfg.selection.clip_gates or cfg.optim.max_grad_norm <= 0:
            return None
        return torch.linalg.vector_norm(gate_grad)

    def _host_sync(self, step: int, local: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float, float]:
        """The step's one host sync: (this rank's loss, the mean over ranks, the gradient
        norm); a loss that is not finite on any rank stops the run, naming the rank, and
        so does a gradient norm that is not (the same on every rank)."""
        values = torch.stack([local, all_reduce_mean_(local.clone()), grad_norm.to(local)]).tolist()
        local_f, mean_f, norm_f = values
        if not math.isfinite(local_f) and self._trained_tokens == 0:
            raise TrainingError(
                f"loss is {local_f} at optimizer step {step} on rank {self.env.global_rank}: its micro-batches hold "
                "no token to train on (every label masked), so the loss divides zero by zero; the data's rows with "
                "nothing to train are dropped when tokenised (data.max_untrained_share): check data.format and the "
                "template with `wlora-dist preview`"
            )
        for value, where in ((local_f, f"rank {self.env.global_rank}"), (mean_f, "another rank")):
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at optimizer step {step} on {where}; "
                    "lower optim.lr / selection.lr_w or check the data"
                )
        if not math.isfinite(norm_f):
            # The loss was finite but its backward overflowed: the step just taken wrote
            # non-finite adapters, so the run stops here (before any save or export of them).
            raise TrainingError(
                f"gradient norm is {norm_f} at optimizer step {step} (the loss, {mean_f:.4g}, was finite): the "
                "backward overflowed; resume from the last checkpoint with a lower optim.lr, optim.max_grad_norm "
                "> 0, or check the base model's weights"
            )
        return local_f, mean_f, norm_f

    def _record_memory(self, step: int) -> None:
        """This rank's trainable / optimizer bytes at the last selection step and the first
        after the prune event (the final report's before / after)."""
        sel = self.cfg.selection
        if step in (sel.steps, sel.steps + 1) and sel.method != "none":
            self.memory["before" if step == sel.steps else "after"] = self.backend.memory_report()

    def _change_layout(self, change: LayoutChange) -> float:
        """A WeightLoRA+ round or the prune event: the selector changes the adapters; here
        the probe loss around it (continuity), the re-plan, the report and the log."""
        t0 = time.perf_counter()
        before = self.probe_loss()
        t1 = time.perf_counter()
        event = self.selector.apply(change, self.backend)
        if change.kind == "prune" and self.cfg.memory.replan_at_prune:
            self._replan()
        event.layout_seconds = time.perf_counter() - t1
        event.probe_losses = (before, self.probe_loss())  # equal unless re-initialised
        event.seconds = time.perf_counter() - t0
        self.layout_events.append(event)
        if change.round_:
            self.rounds_log.append(round_record(event))
        if change.kind == "prune":
            self.prune_seconds = event.seconds
        out = self.run.paths.report if self.env.is_main and self.cfg.output.reports else None
        report_layout_change(event, self.wl, out, self.rounds_log, self.logger)
        for cb in self.callbacks:
            cb.on_layout_change(self, event)
        return event.seconds

    def _replan(self) -> None:
        if not self.cfg.model.gradient_checkpointing:
            return
        kept = [(s.layer, s.kind) for s in self.wl.kept_sites() if s.layer is not None]
        inp = replan.plan_input(self.cfg, self.env, self.spec, self.wl.base_model, kept)
        self.replanned = replan.replan_at_prune(inp, self.wl.base_model, self.logger)

    # ------------------------------------------------------------------ checkpoints, eval

    def save_checkpoint(self, step: int) -> Path:
        """Collective: every rank writes its shards; one folder, complete or absent."""
        t0 = time.perf_counter()
        path = run_checkpoint.save_run(
            self.run.paths.checkpoints, step, self.cfg, self.env, self.selector, self.backend, self.rounds_log
        )
        self.logger.info("checkpoint of step %d -> %s (%.2f s)", step, path, time.perf_counter() - t0)
        assert self.saves is not None
        self.saves.saved()
        return path

    def probe_loss(self) -> float:
        """Loss of the last training micro-batch, dropout off."""
        loss = evaluation.probe_loss(self.backend.module, self._last_batch, self._autocast)
        self.backend.release_gathered()
        return loss

    def evaluate(self) -> dict:
        """Token-weighted eval loss over every rank (eval_batches per rank); {} without eval data."""
        if self.eval_loader is None:
            return {}
        limit = self.cfg.train.eval_batches
        out = evaluation.evaluate(self.backend.module, self.eval_loader, limit, self.env.device, self._autocast)
        self.backend.release_gathered()
        return out

    def _result(self, history: list[dict], **kw: object) -> TrainResult:
        kept = [s.name for s in self.wl.kept_sites()]
        paths = self.run.paths
        return TrainResult(paths.adapter, paths.report, kept, history, memory=self.memory, **kw)  # type: ignore[arg-type]

    def cleanup(self) -> None:
        if self.saves is not None:
            self.saves.stopper.uninstall()
        self.logger.close(self.outcome)
