"""Checkpoints, in one package: a run saves and resumes through ``manager``, which asks each
stateful part for its own state (the selector: the adapter layout and the gates; the
backend: the adapters and their AdamW state, as it shards them; the loop: the step and the
data position) and names every tensor by the one key scheme of ``keys``.

One checkpoint is a folder ``<checkpoint dir>/step-00000120/``::

    meta.json               step, phase (selection / pruned), kept adapters, data position,
                            world size, what the run was (for the compatibility check), and
                            the peft adapter config (``wlora-dist export`` needs nothing else)
    config.json             the run's config
    state/*.safetensors     adapters, their AdamW state, the gates: written by
                            torch.distributed.checkpoint (DCP), every rank its own shards
                            (FSDP2 DTensors; replicated / gathered tensors once); loading
                            reshards to any world size and any backend
    rng/rank-00000.safetensors  each rank's torch RNG states (dropout)

| module | what it holds |
|---|---|
| ``folders`` | which checkpoints a folder holds, which are intact, which one a run resumes |
| ``meta`` | meta.json, and what a resuming run must share with the checkpoint |
| ``keys`` | the tensor names (``adapter.*``, ``optim.*``, ``wlora.gates``) |
| ``storage`` | writing one folder atomically (DCP shards, RNG files, checksums) and reading it |
| ``manager`` | saving a run and bringing a fresh run back to a checkpoint |
| ``schedule`` | when a run saves; stopping on a signal |
| ``peft`` | the standard peft adapter folder: from a run, or from a checkpoint (``wlora-dist export``) |
"""
