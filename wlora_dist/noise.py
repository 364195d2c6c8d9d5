"""Known third-party noise, dropped at its source (light: no heavy imports, so the command
line installs it before torch, DeepSpeed or bitsandbytes are imported and print)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator


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
    # torch's deprecation of the collectives DeepSpeed's ZeRO-3 calls on every gather and
    # reduce (a few hundred lines a run); our own code does not call them.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    # torch.distributed.checkpoint in a single process (export, a one-process run's
    # checkpoint): it works without a process group and says so on every save and load.
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
    # MLflow's local store prints its schema migration on a run's first use of the file.
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("DeepSpeed", "bitsandbytes.backends.cpu.ops", "bitsandbytes"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())


@contextlib.contextmanager
def drop_printed(*needles: str) -> Iterator[None]:
    """Run a third-party call that print()s known noise to stdout (DeepSpeed's 'DeepSpeed
    deepspeed.ops.comm.deepspeed_shm_comm_op built successfully', once per rank): its other
    output is passed on, those lines are not."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(True) if not any(n in line for n in needles)]
        sys.stdout.write("".join(kept))
