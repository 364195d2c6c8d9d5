"""The building blocks of the run configuration's sections: a ``Section`` (pydantic: unknown
fields refused, no silent coercion), field types that accept what YAML and the command line
give, and range checks that say the field's value and what it must be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# The linears of a Llama decoder layer, in layer order: the adapter sites of the method and
# the planner's module kinds (one list for the whole project).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 fuses q/k/v and gate/up into one linear each; no other family has these names.
FUSED_LINEARS = ("qkv_proj", "gate_up_proj")


class Section(BaseModel):
    """One section of the run config. Strict: a string is not an int, an int not a bool
    (a YAML typo must not change a run's meaning); floats and lists are the exceptions
    below. Unknown fields are refused. Frozen: a loaded config is never changed (a
    different one is made with ``model_copy(update=...)``)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False, frozen=True)


def field(default: Any, doc: str) -> Any:
    """A field with its default and its documentation (the one source of ``--help``); a
    section class as the default makes a fresh one for each config."""
    if isinstance(default, type):
        return Field(default_factory=default, description=doc)
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=doc)
    return Field(default=default, description=doc)


def to_float(value: Any) -> Any:
    """YAML reads 1e-4 (no dot) as a string; an int is a float; a bool is neither."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _to_list(value: Any) -> Any:
    """A single item where a list is expected is a list of one."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value


Float = Annotated[float, BeforeValidator(to_float)]
StrList = Annotated[list[str], BeforeValidator(_to_list)]
IntList = Annotated[list[int], BeforeValidator(_to_list)]
FloatList = Annotated[list[Float], BeforeValidator(_to_list)]


def check(ok: Callable[[Any], bool], must: str) -> AfterValidator:
    """A range check: ``{value} {must}`` when ``ok(value)`` is false."""

    def validate(value: Any) -> Any:
        if not ok(value):
            raise ValueError(f"{value} {must}")
        return value

    return AfterValidator(validate)


def at_least(low: float, why: str = "") -> AfterValidator:
    return check(lambda v: v >= low, f"must be >= {low:g}" + (f" ({why})" if why else ""))


def in_unit(closed: bool = False) -> AfterValidator:
    """In [0, 1) (or [0, 1])."""
    return check(
        lambda v: 0 <= v <= 1 if closed else 0 <= v < 1, "must be in [0, 1]" if closed else "must be in [0, 1)"
    )
