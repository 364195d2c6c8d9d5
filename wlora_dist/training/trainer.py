"""The training loop: setup -> train (selection -> prune event -> LoRA on K) -> export -> cleanup.
The method is method/'s ``Selector``, the distribution a distributed/ ``Backend``, the setup
steps build.py's, the layout changes layout.py's, checkpoints wlora_dist/checkpoint/'s.

    torchrun --nproc_per_node 2 train.py --config configs/tiny_cpu.yaml
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml train.py --config configs/tiny_cpu.yaml
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import set_seed

from wlora_dist.checkpoint import manager
from wlora_dist.checkpoint.schedule import SaveSchedule
from wlora_dist.config import ConfigError, RunConfig
from wlora_dist.data import pipeline as data_mod
from wlora_dist.distributed.base import Backend, WeightsSource
from wlora_dist.distributed.env import DistEnv, all_reduce_mean_
from wlora_dist.distributed.registry import make_backend
from wlora_dist.distributed.spec import BackendSpec
from wlora_dist.method.schedule import run_lr_multiplier
from wlora_dist.method.selector import Selector
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.offload import OffloadActivations
from wlora_dist.resolved import ResolvedRun, resolve_run
from wlora_dist.training import evaluation, replan, run_text
from wlora_dist.training.build import build_data, build_model, step_inputs
from wlora_dist.training.callbacks import Callback
from wlora_dist.training.final_outputs import FinalRecord, save_outputs
from wlora_dist.training.inputs import StepInputs
from wlora_dist.training.layout import Layout
from wlora_dist.training.preflight import check_output_free
from wlora_dist.training.results import TrainResult, check_finite
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
        self.env, self.callbacks, self.handle_signals = env, list(callbacks), handle_signals
        self.outcome = "failed"  # what the trackers are told at cleanup: finished / stopped / failed
        self.steps_per_epoch: int | None = None  # optimizer steps in one pass over data.train (None: batches given)
        self.start_step = 0
        # Made by setup(), in this order (the run sized from the data first):
        self.eval_loader: DataLoader | None = None
        self.saves: SaveSchedule | None = None  # when to checkpoint; the stop signals
        self.logger: RunLogger | None = None  # made once the run is accepted: nothing is written before
        self.inputs: StepInputs  # micro-batch -> this rank's model inputs (its chunk under sequence parallelism)
        self.backend: Backend  # owns the trainable parameters (backend.params) and the optimizer
        self.wl: WeightLoRA  # the model with its adapters and gates
        self.selector: Selector  # the gate update and the layout changes
        self.layout: Layout  # the layout changes and their record
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
        """Data, model, adapters, backend, resume, logger. ``model``: a base model to train
        instead of loading model.path (built on meta: filled from ``weights``); ``batches``:
        training micro-batches instead of data.* (no eval)."""
        env, paths = self.env, self.run.paths
        check_output_free(self.cfg, paths.adapter, paths.checkpoints, resumes=self.run.resume is not None)
        set_seed(self.cfg.train.seed)  # the same on every rank: identical adapter init
        loader = None
        if batches is None:  # before the model load: bad data fail fast
            self.run, data = build_data(self.run, env)
            loader, self.eval_loader, self.steps_per_epoch = data.train, data.eval, data.steps_per_epoch
        if not self.run.sized:
            raise ConfigError(["train.epochs / *_fraction / *_ratio size a run from its data: give data.train"])
        cfg = self.cfg  # final from here on
        self.saves = SaveSchedule(cfg.checkpoint, cfg.train.max_steps)
        self.backend = make_backend(self.run.backend_settings(env.device.type), env, weights)
        if model is None:
            log.info("model: loading %s (%s)", cfg.model.path, self.spec.name)
            model = self.backend.load_base(cfg.model)
        self.inputs, group = step_inputs(cfg, env)
        self.wl, self.selector = build_model(model, cfg, env, self.backend, self._on_attached, group)
        self.layout = Layout(cfg, env, self.spec, paths, self.selector, self.backend)
        replan.log_plan(replan.plan_input(cfg, env, self.spec, self.wl.base_model, None))
        if self.run.resume is not None:
            resumed = manager.resume(self.run.resume, cfg, env, self.selector, self.backend)
            self.start_step = resumed.loop.step
            self.layout.resumed(resumed.event, resumed.loop.rounds_log, log.info)
        # Accepted: only now is anything written (logs/, the trackers' config copy).
        self.logger = RunLogger.for_run(cfg, paths.logs, env.is_main, self.steps_per_epoch, self.start_step)
        # Data position: rows of the global batch already consumed -> this rank's micro-batches.
        start = self.start_step * cfg.train.grad_accum_steps
        self.train_iter = data_mod.forever(loader, start) if loader is not None else batches  # type: ignore[assignment]
        if self.handle_signals and cfg.checkpoint.save_on_signal:
            self.saves.stopper.install()
        trainable = sum(self.backend.numel(p) for p in self.backend.params)
        self.logger.info(run_text.start_line(cfg, env, self.spec, self.wl, trainable))
        self.logger.info(run_text.run_length(cfg, env.world_size, self.steps_per_epoch, self.start_step))

    def _on_attached(self, wl: WeightLoRA) -> None:
        self.wl = wl  # what callbacks read of the trainer
        for cb in self.callbacks:
            cb.on_adapters_attached(self, wl)

    # ------------------------------------------------------------------ train

    def train(self) -> TrainResult:
        cfg, history, logger, saves = self.cfg, [], self.logger, self.saves
        assert logger is not None and saves is not None, "call setup() first"
        self.backend.module.train()
        for step in range(self.start_step + 1, cfg.train.max_steps + 1):
            metrics = self.train_step(step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                metrics.update(self.evaluate())
            history.append(metrics)
            postfix = {"loss": f"{metrics['loss']:.3f}", "lr": f"{metrics['lr']:.2e}"}
            postfix.update({"tok/s": f"{metrics['tokens_per_s']:.0f}", "kept": f"{metrics['kept']}/{self.wl.n}"})
            logger.step(step, metrics, postfix)
            stop, save = saves.check(step, self.env.device)  # every rank, whichever got the signal
            if save:
                path = self.save_checkpoint(step)
            if stop:
                logger.info(
                    "stop signal received: checkpoint of step %d in %s; resume with checkpoint.resume_from=auto",
                    step,
                    path,
                )
                self.outcome = "stopped"
                return self._result(history, stopped_at=step, checkpoint=path)
        final_eval = self.evaluate()
        if final_eval:
            logger.track(cfg.train.max_steps, final_eval)
            logger.info("final eval: loss %.4f perplexity %.2f", final_eval["eval_loss"], final_eval["eval_ppl"])
        record = self.layout.record
        final = FinalRecord(
            cfg.train.max_steps,
            {**record.memory, "prune_seconds": record.prune_seconds},
            {"rounds": record.rounds_log},
            run_text.card_rows(cfg, final_eval) if self.env.is_main else None,
        )
        save_outputs(self.wl, self.backend, self.env, logger, self.run, final)
        logger.artifacts(self.run.paths.adapter, self.run.paths.report, cfg.train.max_steps)
        self.outcome = "finished"
        return self._result(history, eval_loss=final_eval.get("eval_loss"))

    def train_step(self, step: int) -> dict:
        """Optimizer step ``step`` (1-based), then the layout change the schedule puts after it."""
        metrics = self._optimizer_step(step)
        change = self.selector.change_at(step)
        if change is not None:
            assert self.logger is not None
            event = self.layout.change(change, self.probe_loss, self.logger)
            for cb in self.callbacks:
                cb.on_layout_change(self, event)
            what = "prune" if change.kind == "prune" else "round"
            metrics[f"{what}_seconds"] = event.seconds
            metrics[f"{what}_layout_seconds"] = event.layout_seconds
            # The state after the event (trackers' summaries keep the last value logged).
            metrics["kept"] = int(self.wl.kept.sum())
            metrics["gates_nonzero"] = int((self.wl.gates != 0).sum())
        return metrics

    def _forward(self) -> contextlib.ExitStack:
        """A forward's context: bf16 autocast, activations to the host (as the run asks)."""
        stack = contextlib.ExitStack()
        if self.backend.settings.precision.bf16:
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        if self.cfg.train.offload_activations:
            stack.enter_context(OffloadActivations())
        return stack

    def _optimizer_step(self, step: int) -> dict:
        """One optimizer step, in this order: the micro-batches (forward, backward) -> the
        adapters' gradients reduced over ranks -> the gates' gradient reduced (the
        selector all-reduces it) -> clip and the optimizer step -> the one host sync
        (losses and norm, checked finite) -> the gates' step and projection -> the metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        loss, tokens = self._micro_batches()
        self.backend.reduce_gradients()
        mult = run_lr_multiplier(step, cfg.optim, cfg.selection, cfg.train.max_steps)
        gates_train = self.selector.trains_gates(step)
        gate_grad = self.selector.reduce_gate_grad() if gates_train else None
        clips_gates = gate_grad is not None and cfg.selection.clip_gates and cfg.optim.max_grad_norm > 0
        gate_norm = torch.linalg.vector_norm(gate_grad) if clips_gates else None  # clipped with the adapters
        grad_norm = self.backend.step(cfg.optim.lr * mult, cfg.optim.max_grad_norm, gate_norm)
        # The one host sync: this rank's loss, the mean over ranks, the gradient norm (checked finite).
        values = torch.stack([loss, all_reduce_mean_(loss.clone()), grad_norm.to(loss)]).tolist()
        check_finite(step, values, self.env.global_rank, self._trained_tokens)
        local_loss, mean_loss, norm = values
        self.layout.record_memory(step)
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

    def _micro_batches(self) -> tuple[torch.Tensor, float]:
        """Forward and backward of the step's micro-batches: (their mean loss on this rank,
        kept on the device; the tokens they held)."""
        env, accum = self.env, self.cfg.train.grad_accum_steps
        loss_sum, tokens = torch.zeros((), device=env.device), 0
        self._trained_tokens = 0
        for micro in range(accum):
            cpu_batch = next(self.train_iter)
            tokens += self.inputs.tokens(cpu_batch)  # counted on the host copy: no device sync
            self._trained_tokens += data_mod.count_trained(cpu_batch)
            self._last_batch = self.inputs(cpu_batch)  # this rank's chunk under sequence parallelism
            with self._forward():
                loss = self.inputs.loss(self.backend.module(**self._last_batch).loss)
            self.backend.backward(loss / accum, last_micro_step=micro == accum - 1)
            loss_sum += loss.detach()
        return loss_sum / accum, tokens

    # ------------------------------------------------------------------ checkpoints, eval

    def save_checkpoint(self, step: int) -> Path:
        """Collective: every rank writes its shards; one folder, complete or absent."""
        assert self.logger is not None and self.saves is not None
        t0 = time.perf_counter()
        loop = manager.LoopState(step, self.layout.record.rounds_log)
        path = manager.save_run(self.run.paths.checkpoints, self.cfg, self.env, self.selector, self.backend, loop)
        self.logger.info("checkpoint of step %d -> %s (%.2f s)", step, path, time.perf_counter() - t0)
        self.saves.saved()
        return path

    def probe_loss(self) -> float:
        """Loss of the last training micro-batch, dropout off."""
        loss = evaluation.probe_loss(self.backend.module, self._last_batch, self._forward, self.inputs.loss)
        self.backend.release_gathered()
        return loss

    def evaluate(self) -> dict:
        """Token-weighted eval loss over every rank (eval_batches per rank); {} without eval data."""
        if self.eval_loader is None:
            return {}
        limit = self.cfg.train.eval_batches
        out = evaluation.evaluate(self.backend.module, self.eval_loader, limit, self.inputs, self._forward)
        self.backend.release_gathered()
        return out

    def _result(self, history: list[dict], **kw: object) -> TrainResult:
        kept = [s.name for s in self.wl.kept_sites()]
        paths, memory = self.run.paths, self.layout.record.memory
        return TrainResult(paths.adapter, paths.report, kept, history, memory=memory, **kw)  # type: ignore[arg-type]

    def cleanup(self) -> None:
        if self.saves is not None:
            self.saves.stopper.uninstall()
        if self.logger is not None:
            self.logger.close(self.outcome)
