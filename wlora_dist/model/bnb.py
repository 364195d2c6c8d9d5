"""bitsandbytes, imported only where a quantised base needs it (an optional dependency: the
``int8`` extra), with one message naming the setting that needs it."""

from __future__ import annotations

from typing import Any

from wlora_dist.errors import UserError


def require_bitsandbytes(quantization: str = "int8") -> Any:
    """The bitsandbytes module; a UserError naming ``model.quantization`` when it is absent."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - the int8 extra (bitsandbytes) is part of `make setup`
        raise UserError(
            f"model.quantization={quantization} needs bitsandbytes: pip install 'wlora_dist[int8]' "
            "(or bitsandbytes>=0.45)"
        ) from None
    return bnb
