"""Every private API of torch, DeepSpeed, accelerate, transformers and datasets that wlora_dist relies on,
in one table, each checked to exist in the installed version: an upgrade that removes or
renames one fails here, naming where wlora_dist uses it, before it fails in a run.

pyproject.toml bounds these packages to the minor versions this suite passes with; raising
a bound means running this file (and the suite) against the new version first.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Private:
    package: str
    what: str  # module:attribute (dotted within the module), or module:Class.attr for source checks
    used_in: str  # where wlora_dist relies on it, and for what
    # Names the class's (or function's) source must contain. A class, not Module.__init__:
    # once torch.compile has run, dynamo has wrapped nn.Module.__init__ in a function of its own.
    in_source: tuple[str, ...] = ()


PRIVATE = [
    Private(
        "torch",
        "torch.distributed.tensor._utils:compute_local_shape_and_global_offset",
        "distributed/base.py: which rows of a DTensor this rank holds (Backend.held, for sharded loading)",
    ),
    Private(
        "torch",
        "torch.distributed.fsdp._fully_shard._fsdp_state:FSDPState",
        "distributed/fsdp2.py: _reset_lazy_init / _forget_removed_units (FSDP2 has no API to add or drop a unit)",
        ("_is_root", "_state_ctx", "_comm_ctx"),
    ),
    Private(
        "torch",
        "torch.distributed.fsdp._fully_shard._fsdp_state:FSDPStateContext",
        "distributed/fsdp2.py: the root's list of every unit (all_states)",
        ("all_states",),
    ),
    Private(
        "torch",
        "torch.distributed.fsdp._fully_shard._fsdp_param_group:FSDPCommContext",
        "distributed/fsdp2.py: the last forward's unit order, which keeps removed adapters alive",
        ("post_forward_order",),
    ),
    Private(
        "torch",
        "torch.distributed.fsdp._fully_shard._fully_shard:FSDPModule._get_fsdp_state",
        "distributed/fsdp2.py: a unit's FSDP state",
    ),
    Private(
        "torch",
        "torch.nn.modules.module:Module",
        "model/sharded_loading.py: recomputing non-persistent buffers after sharded loading",
        ("_non_persistent_buffers_set",),
    ),
    Private(
        "torch",
        "torch.testing._internal.distributed.fake_pg:FakeStore",
        "benchmarks/harness.py: a large world size simulated in one process",
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.zero.partitioned_param_coordinator:PartitionedParameterCoordinator."
        "_PartitionedParameterCoordinator__params_to_release",
        "distributed/zero_internals.py: clear_stage3_release_cache (its class-level lru_cache keeps removed "
        "adapters alive)",
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3",
        "distributed/zero_internals.py: the fp32 master partitions and inner optimizer (memory report, Adam "
        "state carry-over)",
        ("fp32_partitioned_groups_flat", "self.optimizer ="),
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer",
        "distributed/zero_internals.py: the fp32 master partitions; the lazy link of Adam state fragments",
        ("single_partition_of_fp32_groups", "_lazy_init_hp_params_optimizer_state"),
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.zero.parameter_offload:DeepSpeedZeRoOffload",
        "distributed/zero_internals.py: destroy_engine drops the per-module backward Functions ZeRO-3 stores once",
        ("pre_bwd_fn", "post_bwd_fn"),
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.zero.partition_parameters:register_external_parameter",
        "distributed/zero_internals.py: destroy_engine forgets the external parameters ZeRO-3 registered on a module",
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.zero.partition_parameters:Init._convert_to_deepspeed_param",
        "distributed/zero.py, model/sharded_loading.py: ds_tensor / ds_shape / ds_numel / ds_status / "
        "ds_process_group / ds_active_sub_modules / partition of a ZeRO-3 parameter",
        ("ds_tensor", "ds_shape", "ds_numel", "ds_status", "ds_process_group", "ds_active_sub_modules", "partition"),
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.engine:DeepSpeedEngine",
        "distributed/zero_internals.py: destroy_engine removes the engine's own module hooks",
        ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"),
    ),
    Private(
        "torch",
        "torch.nn.modules.module:Module",
        "model/loading.py: remove_input_require_grads removes the embeddings' require-grad hooks from the module's "
        "forward hooks",
        ("_forward_hooks",),
    ),
    Private(
        "transformers",
        "transformers.modeling_utils:PreTrainedModel.enable_input_require_grads",
        "model/loading.py: remove_input_require_grads finds the hook by its name (transformers keeps a handle to "
        "the last one registered only)",
        ("make_inputs_require_grads", "_require_grads_hooks"),
    ),
    Private(
        "accelerate",
        "accelerate.commands.launch:_validate_launch_command",
        "distributed/launchers.py: what `accelerate launch` would choose, read through its own code",
    ),
    Private(
        "datasets",
        "datasets.arrow_dataset:Dataset.__init__",
        "data/cache.py: the rows' fingerprints key the tokenised cache",
        ("_fingerprint",),
    ),
]


def _resolve(what: str) -> object:
    module_name, _, dotted = what.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("p", PRIVATE, ids=lambda p: p.what.split(":")[1])
def test_every_private_api_wlora_dist_uses_is_there(p):
    hint = f"{p.package} changed: wlora_dist relies on {p.what} ({p.used_in})"
    try:
        obj = _resolve(p.what)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{hint}; {e}")
    if p.in_source:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
        missing = [name for name in p.in_source if name not in source]
        assert not missing, f"{hint}; no longer mentions {missing}"


def test_the_bounded_packages_are_the_ones_with_private_apis():
    """pyproject.toml caps exactly the packages named above (plus peft, transformers and
    bitsandbytes, whose internals the tests pin bitwise)."""
    import tomllib

    from .conftest import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    capped = {s.split(">")[0].split("<")[0].split("=")[0].strip() for s in specs if "<" in s}
    assert {p.package for p in PRIVATE} <= capped, capped
