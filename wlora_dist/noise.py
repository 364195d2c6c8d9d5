"""Known third-party noise, dropped at its source (light: no heavy imports, so the command
line installs it before torch, DeepSpeed or bitsandbytes are imported and print)."""

from __future__ import annotations

import logging
import warnings


class _DropKnownNoise(logging.Filter):
    """Third-party lines that say nothing to a wlora_dist user, at their source: DeepSpeed's
    'Setting accelerator to CPU' on every start, bitsandbytes' note that an optional 4-bit
    CPU kernel package is absent (printed even without a quantised base)."""

    NOISE = ("Setting accelerator to", "kernels-community", "pip install kernels")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def silence_known_noise() -> None:
    # transformers' own deprecation, raised from inside transformers / peft on every start.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name in ("DeepSpeed", "bitsandbytes.backends.cpu.ops", "bitsandbytes"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())
