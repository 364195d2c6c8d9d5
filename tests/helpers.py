"""Helpers the test modules share (no test module imports another's private helpers)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .conftest import ROOT, tiny_config_dict

WORKER = ROOT / "tests" / "dist_worker.py"

# ---------------------------------------------------------------- launched processes
# Every command a test launches (torchrun and its ranks, accelerate, the CLI) runs in a
# session of its own, so its whole process tree dies with the test: on failure, timeout,
# Ctrl-C of pytest (KeyboardInterrupt) or SIGTERM to pytest. subprocess.run alone kills
# only the launcher, and the ranks it started lived on with parent 1.

_LIVE: set[int] = set()  # process-group ids (= launcher pids) of commands still running


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _LIVE.discard(pgid)


def kill_all_launched() -> None:
    for pgid in list(_LIVE):
        _kill_group(pgid)


atexit.register(kill_all_launched)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM to pytest (a CI timeout, a scheduler) would end it without atexit: kill the
    launched trees first, then die as asked."""
    kill_all_launched()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
    signal.signal(signal.SIGTERM, _on_sigterm)


def start(cmd: Sequence[str], **popen: object) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session; ``stop`` (or pytest's exit) kills its tree."""
    proc = subprocess.Popen(list(cmd), start_new_session=True, **popen)  # type: ignore[call-overload]
    _LIVE.add(proc.pid)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Kill what is left of ``proc``'s process tree (ranks a dead launcher left behind)."""
    _kill_group(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run_command(
    cmd: Sequence[str], timeout: float, env: dict | None = None, cwd: Path | str | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose whole process tree is
    killed when it ends, times out or the test is interrupted."""
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(
    cfg: dict, nproc: int, tmp: Path | None = None, torchrun: bool = False, env_extra: dict | None = None
) -> list[dict]:
    """Run tests/dist_worker.py on ``cfg`` in ``nproc`` processes (gloo on CPU, nccl on a
    GPU; 1: plain python unless ``torchrun``); returns each rank's record (rank order)."""
    return run_worker_many([cfg], nproc, torchrun, env_extra)[0]


def run_worker_many(
    cfgs: list[dict], nproc: int, torchrun: bool = False, env_extra: dict | None = None, timeout: float = 900
) -> list[list[dict]]:
    """Several runs one after another in one launch (one process group, one start-up):
    each run's rank records. ``timeout``: seconds before the whole launch is killed."""
    for cfg in cfgs:
        Path(cfg["output"]["dir"]).mkdir(parents=True, exist_ok=True)
    cfg_path = Path(cfgs[0]["output"]["dir"]) / "cfgs.json"
    cfg_path.write_text(json.dumps(cfgs))
    launch(WORKER, cfg_path, nproc, torchrun, env_extra, timeout)
    outs = [Path(c["output"]["dir"]) for c in cfgs]
    return [[json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)] for out in outs]


def launch(
    worker: Path, arg: Path, nproc: int, torchrun: bool = False, env_extra: dict | None = None, timeout: float = 900
) -> None:
    """``worker arg`` in ``nproc`` processes (gloo on CPU, nccl on a GPU; 1: plain python
    unless ``torchrun``); fails the test with the ranks' stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, str(worker), str(arg)]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            str(worker),
            str(arg),
        ]
    proc = run_command(cmd, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def zero3_partitioned_config(out: Path, stage: int = 3) -> dict:
    """distributed.* for ZeRO stage ``stage``; at stage 3 with DeepSpeed's persistence
    threshold 0, so the tiny model's parameters (all under its default 1e5 elements, kept
    whole on every rank) are really partitioned, as a real model's are."""
    dist: dict = {"backend": "zero", "zero": {"stage": stage}}
    if stage == 3:
        ds_json = Path(out).parent / "ds_zero3.json"
        ds_json.parent.mkdir(parents=True, exist_ok=True)
        ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        dist["zero"]["config_file"] = str(ds_json)
    return dist


K = 5  # adapters kept by dist_config's runs


def dist_config(tiny_dir: Path, out: Path, backend: str, micro_batch: int, quantization: str = "none") -> dict:
    """The distributed tests' run: global batch 8 rows x 2 micro-steps for every world
    size, K = 5 of 14, prune after step 5 of 9. ``backend``: replicated, fsdp2, zero1/2/3."""
    cfg = tiny_config_dict(
        tiny_dir,
        out,
        selection={"steps": 5, "k": K, "project_every": 5},
        train={"max_steps": 9, "grad_accum_steps": 2, "micro_batch_size": micro_batch},
    )
    cfg["model"]["quantization"] = quantization.removesuffix("-dq")
    if quantization.endswith("-dq"):  # bitsandbytes' double quantisation of the absmax
        cfg["model"]["bnb_4bit_use_double_quant"] = True
    if quantization.removesuffix("-dq") in ("nf4", "fp4"):
        cfg["model"]["bnb_4bit_blocksize"] = 32  # the tiny model's hidden size
    cfg["distributed"] = {"backend": backend}
    if backend.startswith("zero"):
        cfg["distributed"] = zero3_partitioned_config(out, int(backend[-1]))
    return cfg


def rounds_config(
    tiny_dir: Path, out: Path, backend: str, micro_batch: int, quantization: str = "none", **checkpoint
) -> dict:
    """``dist_config`` with a WeightLoRA+ round at step 2 and the prune event at step 4,
    dropout off (each rank draws its own masks: compared across world sizes without) and a
    checkpoint every step unless ``checkpoint`` says otherwise (e.g. resume_from)."""
    cfg = dist_config(tiny_dir, out, backend, micro_batch, quantization)
    cfg["selection"].update(steps=4, rounds=2)
    cfg["adapter"]["lora_dropout"] = 0.0
    cfg["checkpoint"] = checkpoint or {"every": 1, "keep_last": 20}
    return cfg


def assert_base_held_as_uninterrupted(resumed: list[dict], uninterrupted: list[dict]) -> None:
    """A resumed run's ranks hold what the uninterrupted run's held of the frozen base, byte
    for byte: once set up (loaded and resumed) and at the end (after the final eval)."""
    for key in ("base_resident_after_setup", "base_resident_bytes"):
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key
    # Not the whole base where it is sharded: the count sees a gathered base.
    if resumed[0]["backend"] in ("fsdp2", "zero3"):
        shard = (resumed[0].get("mesh_shape") or [len(resumed)])[-1]  # HSDP: the shard group's ranks
        assert max(r["base_resident_bytes"] for r in resumed) < resumed[0]["base_total_bytes"] / shard * 1.1


def assert_same_loss_and_gradients(wl_quantised, wl_float, batch: dict) -> None:
    """One forward and backward of each on ``batch``: the same loss (1e-6) and the same
    gradient of every gate, A and B (1e-5), all of them non-zero."""
    import torch

    losses = []
    for wl in (wl_quantised, wl_float):
        wl.peft_model.train()
        loss = wl.peft_model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wl_quantised.gates.grad, wl_float.gates.grad, rtol=1e-5, atol=1e-6)
    for pq, pf in zip(wl_quantised.trainable_parameters(), wl_float.trainable_parameters(), strict=True):
        assert pq.grad is not None and float(pq.grad.abs().max()) > 0
        torch.testing.assert_close(pq.grad, pf.grad, rtol=1e-5, atol=1e-6)


def train_in_process(tiny_dir: Path, tmp_path: Path, **sections):
    """A 1-process run of ``tiny_config_dict`` (with ``sections``) in this process:
    (trainer, result)."""
    from wlora_dist.config import config_from_dict
    from wlora_dist.distributed.env import init_distributed
    from wlora_dist.training.trainer import Trainer

    cfg = config_from_dict(tiny_config_dict(tiny_dir, tmp_path / "run", **sections))
    trainer = Trainer(cfg, init_distributed())
    trainer.setup()
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    return trainer, result


def int8_modules(model) -> dict:
    """Every quantised linear (Int8Linear, Linear4bit) of ``model`` by its base-model name
    (peft's prefixes removed)."""
    from wlora_dist.model.int8 import Int8Linear
    from wlora_dist.model.nf4 import Linear4bit

    return {
        n.split("base_model.model.", 1)[-1].replace(".base_layer", ""): m
        for n, m in model.named_modules()
        if isinstance(m, (Int8Linear, Linear4bit))
    }


def dequantised_twin(wl8, model_dir: Path, dtype=None, device=None):
    """WeightLoRA on a float model holding ``wl8``'s dequantised weights (8- or 4-bit;
    ``dtype``, default float32, on ``device``), and every A and B of both set to the same
    random values (B non-zero, so the gates get gradients): the reference a quantised run
    must match."""
    import torch
    from transformers import AutoModelForCausalLM

    from wlora_dist.config import AdapterConfig
    from wlora_dist.method.weight_lora import ADAPTER, WeightLoRA

    dtype = dtype or torch.float32
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if device is not None:
        ref = ref.to(device)
    with torch.no_grad():
        for name, m in int8_modules(wl8.peft_model).items():
            ref.get_submodule(name).weight.copy_(m.dequantized_weight().to(dtype))
    ref.requires_grad_(False)
    wlf = WeightLoRA.attach(ref, AdapterConfig(lora_rank=4, lora_alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in wl8.sites:
            for part in ("lora_A", "lora_B"):
                w = torch.randn(getattr(wl8.lora_layer(site), part)[ADAPTER].weight.shape, generator=g) * 0.1
                getattr(wl8.lora_layer(site), part)[ADAPTER].weight.copy_(w)
                getattr(wlf.lora_layer(site), part)[ADAPTER].weight.copy_(w)
    return wlf


def wandb_records(run_dir: Path) -> dict[str, list]:
    """History rows and config items of an offline W&B run folder, read from its
    run-<id>.wandb file. wandb 0.31 ships no Python reader for it; the file is LevelDB's log
    format (32 KiB blocks of records with a 7-byte header: crc32, length, kind 1 = full,
    2/3/4 = first/middle/last piece) after a 7-byte ':W&B' file header, each record one
    wandb_internal_pb2.Record."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out: dict[str, list] = {"history": [], "config": [], "artifacts": [], "exit": [], "preempting": []}
    pos, piece, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            piece = b""
            which = record.WhichOneof("record_type")
            if which == "history":
                out["history"].append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
            elif which in ("config", "run"):
                items = record.config.update if which == "config" else record.run.config.update
                out["config"] += [(i.key, json.loads(i.value_json)) for i in items]
            elif which == "artifact":
                out["artifacts"].append((record.artifact.name, record.artifact.type))
            elif which == "exit":
                out["exit"].append(record.exit.exit_code)
            elif which == "preempting":
                out["preempting"].append(True)
    return out


def assert_export_reproduces_the_model(trainer, base_dir: Path, adapter_dir: Path) -> None:
    """The exported adapter, loaded onto the base with plain peft, gives the trained
    model's logits (1e-5)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=ids).logits
        trainer.wl.peft_model.eval()
        ours = trainer.wl.peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
