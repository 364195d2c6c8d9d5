"""DeepSpeed ZeRO stage 1, 2 or 3, through ``deepspeed.initialize`` on our own module.

Stage 1/2 partition the adapters' optimizer state (and, for 2, gradients) over the ranks;
the frozen base stays replicated. Stage 3 partitions every parameter, base included.
The gates stay outside the engine (they are not module parameters).

At the prune event the engine is destroyed (its hooks removed) and a new one is built
over the same module and the kept adapters, carrying their Adam state over with
DeepSpeed's own tensor-fragment API; the base is never reloaded.
"""

from __future__ import annotations

import copy
import gc
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from wlora_dist.config import ModelConfig, OptimConfig, TrainConfig, ZeROConfig
from wlora_dist.distributed.base import Backend, WeightsSource, decoder_layers, tensor_bytes
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.spec import merge_deepspeed, zero_bucket_numel
from wlora_dist.method.weight_lora import AdapterSite, WeightLoRA
from wlora_dist.model.checkpoint_reader import CheckpointReader
from wlora_dist.model.loading import resolve_dtype
from wlora_dist.model.sharded_loading import Held, build_zero3_partitioned, fill_base
from wlora_dist.noise import drop_printed
from wlora_dist.resolved import ResolvedRun

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(
    zero: ZeROConfig,
    optim: OptimConfig,
    train: TrainConfig,
    bf16: bool,
    user: dict[str, Any],
    limits: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Our settings as a DeepSpeed config; ``user`` (the JSON of zero.config_file, read once:
    ResolvedRun.deepspeed_user) overrides them, except where it says "auto" (the HF
    convention), which takes ours. ``limits``: the ``zero_optimization`` sizes of
    ``memory_limits`` (known once the model is built)."""
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": optim.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": zero.stage, **(limits or {})},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if zero.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if zero.offload_params:
        ours["zero_optimization"]["offload_param"] = {"device": "cpu"}
    return merge_deepspeed(ours, user)


def memory_limits(stage: int, layer_numel: int, trainable_numel: int) -> dict[str, int]:
    """The ZeRO sizes a memory-budgeted adapter trainer sets instead of DeepSpeed's
    defaults, which are tuned for full fine-tuning speed (docs/measurements.md, "ZeRO's
    buffers"):

    - ``reduce_bucket_size`` (and stages 1/2 ``allgather_bucket_size``): DeepSpeed
      allocates gradient buckets of 5e8 elements (stage 3 one per gradient dtype at engine
      start; stages 1/2 one, or two with overlap_comm, every backward): 1 GiB in bf16, 2 in
      fp32, per rank, for gradients that are only the adapters' (megabytes). Capped at the
      trainable element count, so a bucket still holds every gradient at once.
    - stage 3: ``stage3_max_reuse_distance`` and ``stage3_max_live_parameters`` default to
      1e9 parameters: a gathered parameter is kept while it is reused within 1e9
      parameters, so a model under 1e9 parameters stays whole on every rank from forward
      to backward, and a larger one keeps up to 1e9 gathered parameters (2 GiB in bf16) on
      top of its shard; ``stage3_prefetch_bucket_size`` (5e7) gathers ahead by that much.
      Set to one decoder layer (prefetch, reuse: the recomputation and the backward of a
      checkpointed layer share its gathered weights) and two layers live (the one running
      and the one prefetched): FSDP2's behaviour, one layer gathered and the next
      prefetched.

    ``layer_numel``: elements of the largest decoder layer (as stored: int8 / packed 4-bit
    elements for a quantised base)."""
    bucket = zero_bucket_numel(trainable_numel)
    out = {"reduce_bucket_size": bucket}
    if stage == 3:
        out.update(
            stage3_prefetch_bucket_size=layer_numel,
            stage3_max_live_parameters=2 * layer_numel,
            stage3_max_reuse_distance=layer_numel,
        )
    else:
        out["allgather_bucket_size"] = bucket
    return out


def largest_layer_numel(model: nn.Module) -> int:
    """Elements of the largest decoder layer (a ZeRO-3 partitioned parameter counts whole)."""
    return max(sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) for layer in decoder_layers(model))


class ZeROBackend(Backend):
    def __init__(self, run: ResolvedRun, env: DistEnv, weights: WeightsSource | None = None) -> None:
        super().__init__(run, env, weights)
        cfg = run.cfg
        import deepspeed  # optional dependency: imported only when chosen

        self.deepspeed = deepspeed
        bf16 = env.device.type == "cuda" and cfg.train.mixed_precision in ("auto", "bf16")
        self._config_args = (cfg.distributed.zero, cfg.optim, cfg.train, bf16, dict(run.deepspeed_user))
        # Loading (zero.Init) reads the partitioning settings only; the engine gets
        # memory_limits() once the model and the trainable set are known (_initialize).
        self.ds_config = deepspeed_config(*self._config_args)
        self.stage = run.spec.zero_stage
        assert self.stage == int(self.ds_config["zero_optimization"]["stage"]), "resolve_backend reads the same JSON"
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._get_full_state, self._get_full_fp32 = safe_get_full_optimizer_state, safe_get_full_fp32_param
        self.engine: Any = None
        self.peft_model: nn.Module | None = None
        self.base_model: nn.Module | None = None

    def _init_comm(self) -> None:
        if not self.deepspeed.comm.is_initialized():
            with drop_printed("deepspeed_shm_comm_op built successfully"):
                self.deepspeed.init_distributed(dist_backend="nccl" if self.env.device.type == "cuda" else "gloo")

    def load_base(self, cfg: ModelConfig) -> PreTrainedModel:
        """Stage 3: the model is built inside deepspeed.zero.Init, so each parameter is
        partitioned as it is created and loaded; no rank holds the whole model. A float
        base goes through transformers' loader (it sees our HfDeepSpeedConfig); an 8-bit
        one is built with Int8Linear and each rank fills its own partitions, quantising
        the rows it reads. Stages 1/2 replicate the base (an 8-bit one streamed in by
        Backend.load_base / prepare)."""
        if self.stage == 3 and cfg.quantization != "none":
            self._init_comm()
            model = build_zero3_partitioned(cfg, self.env.device, self._partition_config(cfg))
            reader = CheckpointReader(cfg.path, model)
            try:
                self.load_stats = fill_base(model, reader, self.held)  # each rank reads its partitions
            finally:
                reader.close()
            self.loaded_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
            return model
        if self.stage == 3 and cfg.sharded_loading:
            from transformers.integrations import HfDeepSpeedConfig

            self._init_comm()
            self._hf_ds_config = HfDeepSpeedConfig(self._partition_config(cfg))  # must stay alive
        model = super().load_base(cfg)
        # True when every weight was partitioned as it was created (never whole on a rank).
        self.loaded_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        return model

    def _partition_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """The DeepSpeed config the base is built and partitioned with (zero.Init): ours, with
        the precision flags saying model.dtype. zero.Init casts every floating parameter to
        the dtype its config enables (float32 unless bf16 / fp16 is on), and the engine turns
        bf16 on only on a GPU: without this a CPU run asking for a bfloat16 base held it in
        float32, twice the bytes. The engine's own config is unchanged."""
        out = copy.deepcopy(self.ds_config)
        dtype = resolve_dtype(cfg.dtype, self.env.device)
        out["bf16"] = {"enabled": dtype == torch.bfloat16}
        out["fp16"] = {"enabled": dtype == torch.float16}
        return out

    def _prepare(self, wl: WeightLoRA) -> nn.Module:
        self._init_comm()
        self._materialize_if_meta(wl)
        self.peft_model, self.base_model = wl.peft_model, wl.base_model
        self.peft_model.to(self.env.device)
        self._initialize(wl.trainable_parameters())
        return self.engine

    def _initialize(self, params: list[nn.Parameter]) -> None:
        assert self.peft_model is not None and self.base_model is not None
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        limits = memory_limits(self.stage, largest_layer_numel(self.base_model), trainable)
        self.ds_config = deepspeed_config(*self._config_args, limits=limits)
        self.engine, self.optimizer, _, _ = self.deepspeed.initialize(
            model=self.peft_model, model_parameters=params, config=copy.deepcopy(self.ds_config)
        )
        self._module = self.engine

    def release_gathered(self) -> None:
        """ZeRO-3 frees a gathered parameter only when its recorded trace says it is not
        reused soon: after a forward without backward (eval, the probe loss) the trace's
        next use is the backward that never comes, and the last layers (with DeepSpeed's
        defaults, every layer) stay gathered until the next training backward, or for good
        after the final eval. DeepSpeed's own call for this re-partitions every parameter."""
        if self.stage == 3 and self.engine is not None:
            self.engine.empty_partition_cache()

    def build_optimizer(self, params: list[nn.Parameter]) -> None:
        pass  # the engine built it from ds_config

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        # We run the accumulation loop; tell the engine where the boundary is, and do not
        # let it divide the (already divided) loss again.
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        self.engine.backward(loss, scale_wrt_gas=False)

    def reduce_gradients(self) -> None:
        pass  # ZeRO reduces (stage 1: all-reduce, 2/3: reduce-scatter) inside backward

    def step(self, lr: float, max_grad_norm: float, extra_norm: torch.Tensor | None = None) -> torch.Tensor:
        # DeepSpeed clips inside its engine over its own parameters only; selection.clip_gates
        # is refused for zero when the run is set up (Trainer), so extra_norm never comes here.
        assert extra_norm is None, "selection.clip_gates is not available with DeepSpeed ZeRO"
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # clips by ds_config["gradient_clipping"]
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)

    def zero_grad(self) -> None:
        pass  # engine.step() zeroes the gradients

    def gather_full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.stage < 3:
            return tensors
        with self.deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
            return [t.detach().clone() for t in tensors]

    def held(self, param: torch.Tensor) -> Held:
        """A ZeRO-3 parameter: this rank's flat partition, elements [rank * size, (rank + 1) *
        size) of the flattened tensor (the last ones padding past its end), and the whole
        tensor too where DeepSpeed keeps it whole (a persisted small parameter)."""
        if not hasattr(param, "ds_tensor"):
            return super().held(param)
        part = param.ds_tensor
        start = part.ds_numel * self._partition_rank(param)
        whole = param.data if param.data.numel() == param.ds_numel else None
        return Held(part.data, param.ds_shape, start, min(start + part.ds_numel, param.ds_numel), True, whole)

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        return getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned: numel() is 0

    def assign_full(self, param: nn.Parameter, value: torch.Tensor) -> None:
        if self.stage < 3 or not hasattr(param, "ds_id"):  # not partitioned (yet): a plain copy
            super().assign_full(param, value)  # the (re)built engine copies it to its masters
            return
        with torch.no_grad(), self.deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if self.env.global_rank == 0:
                param.copy_(value)  # re-partitioned from rank 0 on exit

    def _rebuild(self, wl: WeightLoRA, replaced: list[AdapterSite], keep_state: bool) -> None:
        kept = wl.trainable_parameters()
        saved: dict = {}
        step = None
        if keep_state:
            saved = {id(p): {k: self._get_full_state(p, k).detach().clone() for k in ADAM_STATE_KEYS} for p in kept}
            step = _adam_step(self.engine.optimizer)
        _partition_gathered(self.peft_model)  # a gathered parameter would outlive the engine that gathered it
        _destroy(self.engine)
        self.engine = self.optimizer = self._module = None
        gc.collect()  # the old engine's partitions hold the removed adapters: free them now
        self._initialize(kept)
        if saved:
            self._restore_adam_state(kept, saved, step)

    def _restore_adam_state(self, kept: list[nn.Parameter], saved: dict, step: torch.Tensor | None) -> None:
        # torch's AdamW creates its state at the first step; create it now in its own
        # format (step, exp_avg, exp_avg_sq per flat fp32 partition) so DeepSpeed's
        # fragment API can write the kept adapters' moments into the new partitions.
        inner = _inner(self.engine.optimizer)
        for flat in _master_partitions(self.engine.optimizer):
            inner.state[flat] = {
                "step": (step if step is not None else torch.zeros(())).clone().float(),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # stage 1/2 link the fragments lazily, at the first step
            link()
        for p in kept:
            for key, value in saved[id(p)].items():
                self._set_full(p, value, key)

    def _set_full(self, param: nn.Parameter, value: torch.Tensor, state_key: str | None = None) -> None:
        """Write a parameter's full fp32 master (``state_key`` None) or Adam moment.

        Stage 3: each rank writes its own slice through DeepSpeed's local setter.
        DeepSpeed's full setter (0.19, ``set_full_hp_param``) cuts ``value`` into
        world-size pieces without the partition padding its reader strips, so it fails
        (``start + length exceeds dimension size``) whenever the world size does not
        divide the parameter's element count (3, 6, 24 ranks on most adapters)."""
        if self.stage < 3 or not hasattr(param, "ds_id"):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            if state_key is None:
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, state_key)
            return
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        local = zero3_local_slice(value, param.ds_tensor.numel(), self._partition_rank(param))
        if state_key is None:
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, state_key)

    def _partition_rank(self, param: nn.Parameter) -> int:
        import torch.distributed as dist

        group = getattr(param, "ds_process_group", None)
        return dist.get_rank(group=group) if dist.is_initialized() else 0

    def checkpoint_tensors(self, named: dict[str, nn.Parameter], for_load: bool) -> dict[str, torch.Tensor]:
        """Full (gathered) fp32 masters and AdamW moments, the same on every rank (so the
        checkpoint writes them once): DeepSpeed's partitions are flat and span parameters,
        its fragment API is how a parameter's share is read and written (collective)."""
        step = None if for_load else _adam_step(self.engine.optimizer)
        # No Adam state yet (a checkpoint right after a WeightLoRA+ round reset it): zeros
        # and step 0 are what torch's AdamW starts from. DeepSpeed's reader raises KeyError.
        no_state = step is None
        out: dict[str, torch.Tensor] = {}
        for name, p in named.items():
            shape = self.full_shape(p)
            value = torch.zeros(shape, dtype=torch.float32) if for_load else self._get_full_fp32(p).float().cpu()
            moments = {k: torch.zeros(shape, dtype=torch.float32) for k in ADAM_STATE_KEYS}
            if not (for_load or no_state):
                for k in ADAM_STATE_KEYS:
                    t = self._get_full_state(p, k)
                    if t is not None:
                        moments[k] = t.detach().float().cpu()
            out[f"adapter.{name}"] = value
            for k, t in moments.items():
                out[f"optim.{name}.{k}"] = t
            out[f"optim.{name}.step"] = (step if step is not None else torch.zeros(())).reshape(1).float().clone()
        return out

    def load_checkpoint_tensors(self, named: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
        params = list(named.values())
        for name, p in named.items():
            value = tensors[f"adapter.{name}"]
            self.assign_full(p, value)  # the module's parameter
            self._set_full(p, value.to(self.env.device))  # and the optimizer's fp32 master
        saved = {
            id(p): {k: tensors[f"optim.{name}.{k}"].to(self.env.device) for k in ADAM_STATE_KEYS}
            for name, p in named.items()
        }
        step = tensors[f"optim.{next(iter(named))}.step"].reshape(()) if named else None
        self._restore_adam_state(params, saved, step)

    def memory_report(self) -> dict[str, int]:
        """This rank's bytes: its partition of the adapters (stage 3) or all of them, its
        fp32 master partition and the inner optimizer's state (exp_avg, exp_avg_sq, step)."""
        local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in self.params]
        inner = _inner(self.engine.optimizer)
        state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        masters = _master_partitions(self.engine.optimizer)
        return {
            "trainable_param_bytes": tensor_bytes(local),
            "optimizer_state_bytes": tensor_bytes(state),
            "master_weight_bytes": tensor_bytes(masters),
        }


def zero3_local_slice(full: torch.Tensor, partition_numel: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of a ZeRO-3 parameter: the flat elements
    [rank * partition_numel, (rank + 1) * partition_numel), zero-filled past the end (the
    last ranks' padding when the world size does not divide the element count)."""
    flat = full.reshape(-1)
    out = torch.zeros(partition_numel, dtype=flat.dtype, device=flat.device)
    start = rank * partition_numel
    n = max(0, min(partition_numel, flat.numel() - start))
    if n:
        out[:n] = flat[start : start + n]
    return out


def _partition_gathered(module: nn.Module | None) -> None:
    """Re-partition every ZeRO-3 parameter of ``module`` left gathered, through DeepSpeed's
    per-parameter ``partition``. At a layout change, where the module already holds the new
    (WeightLoRA+) adapters as plain parameters, which the engine's own
    ``empty_partition_cache`` cannot walk past."""
    if module is None:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE]
    for p in gathered:
        p.ds_active_sub_modules.clear()
    if gathered:
        gathered[0].partition(param_list=gathered)


def _destroy(engine: Any) -> None:
    """engine.destroy() removes the optimizer's gradient hooks and (stage 3) the module
    hooks, but (DeepSpeed 0.19) leaves four things that keep the old engine, and through
    it the removed adapters, alive and partly in use: its own forward hooks on the module,
    ZeRO-3's class-level release cache, ZeRO-3's per-module backward Functions, and its
    per-module registry of "external" parameters.
    Each was found by walking gc referrers from a removed lora_A weight; the tests prove
    the removed tensors freed (weak references dead) under every stage."""
    engine.destroy()
    _clear_stage3_release_cache()
    # ZeRO-3 stores on every module, once ("if 'pre_bwd_fn' not in module.__dict__"),
    # autograd Function classes closing over the offload object that created them. A new
    # engine would reuse the old ones: its backward would drive the OLD coordinator, and
    # they keep the old engine, and through it the removed adapters, alive. Drop them so
    # the new engine makes its own.
    model = getattr(engine, "module", None)
    if model is not None:
        live = {id(p) for p in model.parameters()}
        for module in model.modules():
            for attr in ("pre_bwd_fn", "post_bwd_fn"):
                module.__dict__.pop(attr, None)
            # ZeRO-3 registers "dangling" parameters it sees in a module's forward output
            # on that module (_external_params) and never forgets them: a LoraLayer whose
            # adapter was replaced (WeightLoRA+) kept its old A / B alive that way.
            external = module.__dict__.get("_external_params")
            if external:
                for key in [k for k, v in external.items() if id(v) not in live]:
                    del external[key]
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()


def _clear_stage3_release_cache() -> None:
    """ZeRO-3's PartitionedParameterCoordinator memoises ``__params_to_release`` with a
    class-level functools.lru_cache keyed by (coordinator, submodule): it keeps every
    module it has seen, removed adapters included, alive for the life of the process
    (found by walking gc referrers from a removed lora_A weight). Clearing it only
    costs a recomputation on the next step."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fn = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    # DeepSpeed wraps it in instrument_w_nvtx, a closure without __wrapped__: look inside.
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    for candidate in [fn, *cells]:
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()
            return
    raise RuntimeError("DeepSpeed's ZeRO-3 coordinator changed: cannot clear its module cache to free adapters")


def _master_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, the tensors the inner optimizer steps.
    (Stage 3 detaches them from the inner optimizer's param_groups between steps.)"""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        if hasattr(zero_optimizer, attr):
            return list(getattr(zero_optimizer, attr))
    return [p for g in _inner(zero_optimizer).param_groups for p in g["params"]]


def _inner(zero_optimizer: Any) -> torch.optim.Optimizer:
    return getattr(zero_optimizer, "optimizer", zero_optimizer)


def _adam_step(zero_optimizer: Any) -> torch.Tensor | None:
    for s in _inner(zero_optimizer).state.values():
        if "step" in s:
            return s["step"].clone() if isinstance(s["step"], torch.Tensor) else torch.tensor(float(s["step"]))
    return None
