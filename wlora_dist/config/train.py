"""train.*: how long the run is, its batches, precision, loss and eval."""

from __future__ import annotations

from typing import Annotated, Literal

from wlora_dist.config.fields import Float, Section, at_least, check, field


class TrainConfig(Section):
    max_steps: Annotated[int, at_least(1)] = field(
        100, "Optimizer steps in total (selection phase included); see train.epochs."
    )
    epochs: Annotated[Float, at_least(0, "0 = train.max_steps sets the length")] = field(
        0.0,
        "> 0: train this many passes over the training rows instead of train.max_steps (set one of the two); "
        "max_steps = ceil(epochs x optimizer steps per epoch). selection.steps_fraction and optim.warmup_ratio "
        "size the selection phase and the warmup from it.",
    )
    micro_batch_size: Annotated[int, at_least(1)] = field(4, "Rows per rank per forward/backward.")
    grad_accum_steps: Annotated[int, at_least(1)] = field(1, "Micro-batches accumulated per optimizer step.")
    seed: int = field(0, "Seed for init, dropout and data order (same on every rank).")
    mixed_precision: Annotated[
        Literal["auto", "bf16", "no", "fp16"],
        check(lambda v: v != "fp16", "is not supported (loss scaling would scale the gates); use bf16 or no"),
    ] = field("auto", "bf16 autocast on GPU (auto), or none; CPU runs in the base dtype.")
    loss_shards: Annotated[int, at_least(0, "0 = transformers' loss")] = field(
        0,
        "0 = transformers' loss; N = the cross-entropy in N tiles of tokens (DeepSpeed's TiledFusedLogitsLoss): "
        "the same loss, without three fp32 copies of the logits at the peak (at 128k vocabulary the largest "
        "activation); 8 is a good start.",
    )
    offload_activations: bool = field(
        False,
        "Keep what backward needs in host memory from the forward to the backward (on a GPU: pinned, copied on "
        "a side stream); with model.gradient_checkpointing that is each checkpointed layer's input. For long "
        "sequences, at the cost of host memory and PCIe copies (wlora-dist plan shows both).",
    )
    compile: bool = field(
        False,
        "Compile each decoder layer with torch.compile (inductor), as torchtune does: every layer with the same "
        "adapters shares one graph (after the prune event, one per distinct kept set, at most one per layer). "
        "The first steps and the first step after the prune event pay the compilation (seconds to minutes).",
    )
    eval_every: Annotated[int, at_least(0)] = field(0, "Evaluate every N optimizer steps (0 = only at the end).")
    eval_batches: Annotated[int, at_least(1)] = field(8, "Micro-batches per evaluation (per rank).")
