"""The shape of the code, checked: the method and the planner stay pure (no collectives),
and the backend a run uses is decided in one place, which the planner then plans."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from wlora_dist.config import config_from_dict, load_config
from wlora_dist.distributed.env import DistEnv
from wlora_dist.distributed.launchers import accelerate_config_env, accelerate_overrides
from wlora_dist.distributed.registry import make_backend
from wlora_dist.distributed.spec import BackendSpec, resolve_backend
from wlora_dist.planning.memory_plan import plan
from wlora_dist.planning.sources import PRESETS, run_plan_input
from wlora_dist.resolved import resolve_run
from wlora_dist.training.trainer import Trainer

from .conftest import ROOT, tiny_config_dict

PKG = ROOT / "wlora_dist"
PURE = ["method", "planning"]  # never torch.distributed, never the distributed plumbing
PURE_MAY_IMPORT = {"wlora_dist.distributed.spec", "wlora_dist.distributed.settings"}  # frozen dataclasses


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", [p for d in PURE for p in sorted((PKG / d).glob("*.py"))], ids=lambda p: p.name)
def test_method_and_planner_never_import_torch_distributed(path):
    bad = {
        name
        for name in _imports(path)
        if name.startswith("torch.distributed")
        or (name.startswith("wlora_dist.distributed") and not any(name.startswith(m) for m in PURE_MAY_IMPORT))
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["memory_plan.py", "shapes.py", "search.py"])
def test_the_planners_arithmetic_reads_nothing(name):
    """The planner's arithmetic takes shapes and settings and reads no file, library or
    process group: planning/sources.py does the reading, planning/text.py the printing."""
    allowed = {"__future__", "math", "dataclasses", "typing"}
    allowed |= {"wlora_dist.config", "wlora_dist.distributed.spec", "wlora_dist.planning.shapes"}
    allowed |= {"wlora_dist.planning.memory_plan"}
    modules = set()
    for node in ast.walk(ast.parse((PKG / "planning" / name).read_text())):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    assert modules <= allowed, sorted(modules - allowed)


def test_base_backend_does_not_know_its_children():
    """No import cycle: the interface never imports the backends; the registry does."""
    imports = _imports(PKG / "distributed" / "base.py")
    assert not {n for n in imports if n.split(".")[:3] in (["wlora_dist", "distributed", k] for k in
                ("replicated", "fsdp2", "zero", "registry"))}  # fmt: skip


def test_no_file_points_outside_the_repository():
    # Spelled in pieces so that this file does not match the searches it stands for.
    needles = ("../" + "shared", "FIND" + "INGS.md", "METH" + "OD.md", "shared" + "/design")
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{name}: {n}" for n in needles if n in text]
    assert not offenders, offenders


ACCELERATE_CONFIGS = sorted((ROOT / "launch/accelerate").glob("*.yaml"))
WANT = {  # what each shipped accelerate config launches
    "cpu_2proc.yaml": BackendSpec("replicated"),
    "cpu_fsdp2.yaml": BackendSpec("fsdp2"),
    "cpu_hsdp.yaml": BackendSpec("fsdp2", shard_size=2),
    "cpu_zero3.yaml": BackendSpec("zero", 3),
    "fsdp2.yaml": BackendSpec("fsdp2"),
    "fsdp2_long_context.yaml": BackendSpec("fsdp2", sequence_parallel=4),
    "multinode_fsdp2.yaml": BackendSpec("fsdp2"),
    "multinode_hsdp.yaml": BackendSpec("fsdp2", shard_size=8),
    "zero1.yaml": BackendSpec("zero", 1),
    "zero2.yaml": BackendSpec("zero", 2),
    "zero3.yaml": BackendSpec("zero", 3),
    "zero3_offload.yaml": BackendSpec("zero", 3, offload=True),
}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_plan_describes_the_backend_that_runs(path, tiny_dir):
    """For every shipped accelerate config: the environment accelerate launch gives the
    processes (accelerate's own code) -> the run config -> the backend the trainer builds
    (its spec) equals the planner's input, for the run and for `wlora-dist plan --config`."""
    overrides = [f"model.path={tiny_dir / 'model'}", f"data.train=[{tiny_dir / 'data/train.jsonl'}]"]
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", overrides, accelerate_overrides(accelerate_config_env(str(path))))
    run = resolve_run(cfg)
    assert run.spec == WANT[path.name]
    backend = make_backend(run.backend_settings("cpu"), DistEnv(0, 0, 8, torch.device("cpu")))
    assert backend.spec == run.spec and backend.name == run.spec.name
    inp = run_plan_input(run.cfg, PRESETS["llama3-8b"], 8, run.spec)
    assert inp.backend == run.spec


@pytest.mark.parametrize(
    "setting",
    [{"backend": "auto"}, {"backend": "replicated"}, {"backend": "fsdp2"}]
    + [{"backend": "zero", "zero": {"stage": s}} for s in (1, 2, 3)]
    + [{"backend": "zero", "zero": {"stage": 3, "offload_optimizer": True}}],
    ids=lambda s: str(s),
)
def test_trainer_and_planner_share_the_resolved_backend(setting, tiny_dir, tmp_path):
    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run", distributed=setting))
    trainer = Trainer(cfg, DistEnv(0, 0, 1, torch.device("cpu")))
    assert trainer.spec == resolve_backend(cfg.distributed)
    kind = {"auto": "replicated"}.get(setting["backend"], setting["backend"])
    assert trainer.spec.kind == kind and trainer.spec.zero_stage == setting.get("zero", {}).get("stage", 0)
    assert run_plan_input(cfg, PRESETS["llama3-8b"], 8, trainer.spec).backend == trainer.spec


def test_zero3_plan_at_8b_on_8_ranks_shards_the_base(tmp_path):
    """The bug this layout fixed: a ZeRO-3 run was planned with a replicated base."""
    cfg = load_config(
        ROOT / "configs/llama3_8b_instruct.yaml", ["distributed.backend=zero", "distributed.zero.stage=3"]
    )
    spec = resolve_backend(cfg.distributed)
    assert spec == BackendSpec("zero", 3) and spec.shards_base
    zero3 = plan(run_plan_input(cfg, PRESETS["llama3-8b"], 8, spec))
    replicated = plan(run_plan_input(cfg, PRESETS["llama3-8b"], 8, BackendSpec("replicated")))
    assert abs(zero3.before.base - replicated.before.base / 8) <= 0.01 * replicated.before.base / 8
    assert zero3.before.base / 2**30 < 2.0 < 14.0 < replicated.before.base / 2**30  # 1.87 vs 14.96 GiB


def test_a_users_deepspeed_json_decides_the_stage(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}')
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml", ["distributed.backend=zero", f"distributed.zero.config_file={ds}"]
    )
    assert cfg.distributed.zero.stage == 2  # the config's default ...
    assert resolve_backend(cfg.distributed) == BackendSpec("zero", 3, offload=True)  # ... the JSON wins


# docs/architecture.md, "What may import what": a module imports its own layer or below.
LAYERS = {
    "errors": 0,
    "paths": 0,
    "noise": 0,
    "config": 1,
    "method": 2,
    "planning": 2,
    "distributed.spec": 2,
    "distributed.settings": 2,
    "model": 3,
    "distributed": 4,
    "data": 5,
    "checkpoint": 5,
    "training": 6,
    "resolved": 6,
    "cli": 7,
    "generate": 7,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")[1:]  # without "wlora_dist"
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    return None


def _module_of(path: Path) -> str:
    return ".".join(("wlora_dist", *path.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")


def _wlora_imports(path: Path) -> set[str]:
    """wlora_dist modules ``path`` imports: at the top, in functions, and under
    ``if TYPE_CHECKING:`` (an import for annotations still draws an edge)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wlora_dist."):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # a module imported from its package
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("wlora_dist."))
    return out


MODULES = {_module_of(p): p for p in sorted(PKG.rglob("*.py"))}
GRAPH = {m: {i for i in _wlora_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_no_import_circle():
    """No module reaches itself through the imports (annotations' included), so each module
    can be read and tested after the ones it uses."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = [*path[path.index(module) :], module]
            pytest.fail("import circle: " + " -> ".join(circle))
        if module in done:
            return
        for dep in sorted(GRAPH[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_a_module_imports_only_its_layer_or_below(path):
    module = _module_of(path)
    own = _layer(module)
    if own is None:
        assert module == "wlora_dist", f"{module}: give it a layer in docs/architecture.md and LAYERS"
        return
    above = {m: _layer(m) for m in _wlora_imports(path) if (_layer(m) or 0) > own}
    assert not above, f"{module} (layer {own}) imports from above it: {above}"
