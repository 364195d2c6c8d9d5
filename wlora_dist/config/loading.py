"""Loading a run config: YAML, the launcher's choices, ``key.sub=value`` overrides, the
selection preset; every problem reported at once, each naming the field, the value and
the fix (pydantic finds them; ``_problem`` says them in our words); ``--help`` text."""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from wlora_dist.config.run import RunConfig, validate
from wlora_dist.config.selection import PRESETS
from wlora_dist.errors import UserError


class ConfigError(UserError):
    """All problems found in a configuration, one per line."""

    exit_code = 2
    same_on_every_rank = True

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _field_type(loc: tuple) -> Any:
    """The annotation of the field at ``loc`` (list indices skipped)."""
    model: Any = RunConfig
    tp: Any = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return tp
        tp = fields[part].annotation
        model = _section_of(tp)
    return tp


def _section_of(tp: Any) -> Any:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _problem(err: dict[str, Any]) -> str:
    loc = err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "config"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = _field_type(loc[:-1]) if len(loc) > 1 else RunConfig
        known = list(getattr(_section_of(parent) or RunConfig, "model_fields", {}))
        near = [k for k in known if k.startswith(str(loc[-1])[:3])]
        hint = f"; did you mean {near[0]!r}?" if near else f"; known fields: {', '.join(known)}"
        return f"{where}: unknown field{hint}"
    if kind == "value_error":
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    tp = _field_type(loc)
    if _section_of(tp) is not None or kind in ("model_type", "dict_type"):
        return f"{where}: got {value!r}, expected a mapping of fields"
    expected = type_name(tp) if tp is not None else err["msg"]
    return f"{where}: got {value!r}, expected {expected}" + (" (true/false)" if tp is bool else "")


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {dotted}: {p} is not a section"], "command line")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (key, YAML-typed value)."""
    pairs, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"{item!r}: overrides are written key.sub=value, e.g. train.max_steps=50")
            continue
        try:
            pairs.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as e:
            problems.append(f"{key}: value {raw!r} is not valid YAML ({e.__class__.__name__})")
    if problems:
        raise ConfigError(problems, "command line")
    return pairs


def _apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """The preset's values under the user's: a field set in the config or on the command
    line keeps its value."""
    section = data.get("selection")
    name = section.get("preset", "none") if isinstance(section, dict) else "none"
    if name not in PRESETS:
        return data  # the field's own validation names the choices
    out = copy.deepcopy(data)
    for dotted, value in PRESETS[name].items():
        sec, leaf = dotted.split(".")
        node = out.setdefault(sec, {})
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return out


# (field that sizes from the run, field it replaces): setting both is a contradiction.
_EITHER_OR = (
    ("train.epochs", "train.max_steps"),
    ("selection.steps_fraction", "selection.steps"),
    ("optim.warmup_ratio", "optim.warmup_steps"),
)


def _both_set(data: dict[str, Any]) -> list[str]:
    """A ratio field and the count it replaces, both given by the user."""
    out = []
    for ratio, count in _EITHER_OR:
        (sec, r), (_, c) = ratio.split("."), count.split(".")
        node = data.get(sec)
        if isinstance(node, dict) and node.get(r) and c in node:
            out.append(f"{ratio}: {node[r]!r} and {count}: {node[c]!r} both set; keep one of the two")
    return out


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """The run config of ``data`` (the YAML tree), or a ConfigError with every problem:
    wrong types, unknown fields and out-of-range values at once, then contradictions."""
    data = _apply_preset(data)
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], source)
    cfg, problems = checked_config(data)
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg


def checked_config(data: dict[str, Any]) -> tuple[RunConfig | None, list[str]]:
    """Every problem of ``data`` in one pass, and the config it describes with the faulty
    fields left at their defaults (None if even that does not validate): the contradictions
    between fields (validate) are checked on it too, so a wrong field does not hide them
    until the next attempt. pydantic stops at field errors; what it reports is removed and
    the rest validated again."""
    data = copy.deepcopy(data)
    problems = _both_set(data)
    for _ in range(8):  # each pass removes what pydantic reported; nested sections may need a few
        try:
            cfg = RunConfig.model_validate(data)
        except ValidationError as e:
            errors = e.errors()
            problems += [p for p in (_problem(err) for err in errors) if p not in problems]
            if not any(_remove(data, err["loc"]) for err in errors):
                return None, problems
            continue
        return cfg, problems + [p for p in validate(cfg) if p not in problems]
    return None, problems


def _remove(data: dict[str, Any], loc: tuple) -> bool:
    """Delete the value at ``loc`` (a pydantic error location) so the field takes its default."""
    node: Any = data
    for key in loc[:-1]:
        if not isinstance(node, dict | list) or (isinstance(node, dict) and key not in node):
            return False
        node = node[key]
    if isinstance(node, dict) and loc and loc[-1] in node:
        del node[loc[-1]]
        return True
    return False


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    launcher: list[tuple[str, Any]] | None = None,
) -> RunConfig:
    """Read a YAML run config, apply the launcher's settings (``launcher``, e.g. from an
    accelerate config), then ``key.sub=value`` overrides; validate."""
    data, source = _load_data(path, overrides, launcher)
    return config_from_dict(data, source)


def check_config_file(
    path: str | Path, overrides: list[str] | None = None, launcher: list[tuple[str, Any]] | None = None
) -> tuple[RunConfig | None, list[str]]:
    """``config --check``: every problem of the file's fields and values (with ``key=value``
    ``overrides`` and the launcher's settings applied, as train applies them) in one pass,
    and the config with the faulty fields at their defaults for the checks that follow."""
    data, _ = _load_data(path, overrides, launcher)  # a file that is not YAML is one problem, raised
    return checked_config(_apply_preset(data))


def _load_data(
    path: str | Path | None,
    overrides: list[str] | None,
    launcher: list[tuple[str, Any]] | None,
) -> tuple[dict[str, Any], str]:
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist; pass an existing YAML file"], source)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(data, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], source)
    launcher = launcher or []
    chosen = dict(launcher).get("distributed.backend")
    section = data.get("distributed")
    in_file = section.get("backend", "auto") if isinstance(section, dict) else "auto"
    if chosen and in_file not in ("auto", chosen):
        raise ConfigError(
            [
                f"distributed.backend: {in_file!r} in the config, but the accelerate config launched {chosen!r}; "
                "set distributed.backend: auto (or the same value), or launch with a matching accelerate config"
            ],
            source,
        )
    parsed = parse_overrides(overrides or [])
    on_command_line = dict(parsed).get("distributed.backend")
    if chosen and on_command_line not in (None, "auto", chosen):
        raise ConfigError(
            [
                f"distributed.backend={on_command_line} on the command line, but the accelerate config launched "
                f"{chosen!r}; drop the override, or launch with an accelerate config for {on_command_line}"
            ],
            source,
        )
    for key, value in [*launcher, *parsed]:
        set_dotted(data, key, value)
    return data, source


def describe(cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default, documentation (for --help)."""
    lines = []
    for name, info in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        section = _section_of(info.annotation)
        if section is not None:
            lines.append(f"{dotted}:")
            lines += describe(section, dotted + ".")
            continue
        default = info.get_default(call_default_factory=True)
        lines.append(f"  {dotted} ({type_name(info.annotation)}, default {default!r}): {info.description or ''}")
    return lines
