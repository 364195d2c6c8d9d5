"""End to end through the command line, as a user runs it, on the tiny Llama."""

import hashlib
import json
import os
import re
import socket
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from .conftest import ROOT, tiny_config_dict
from .helpers import run_command

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, timeout=600, **env):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full_env.pop(k, None)
    return run_command(args, timeout=timeout, cwd=ROOT, env=full_env)


def _write_cfg(tmp_path, tiny_dir, name="run", **sections):
    cfg = tiny_config_dict(tiny_dir, tmp_path / name, **sections)
    cfg["log"]["trackers"] = ["jsonl", "tensorboard"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / name


def test_train_py_single_process_end_to_end(tmp_path, tiny_dir):
    cfg, out = _write_cfg(tmp_path, tiny_dir, selection={"steps": 6, "k": 5}, train={"max_steps": 24})
    proc = _run([sys.executable, "train.py", "--config", str(cfg), "optim.lr=1e-2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=1" in proc.stderr and "prune event at step 6: kept 5 of 14" in proc.stderr
    # No terminal (a SLURM log): each step's line says where the run is; the length up front.
    assert re.search(r"run length: 24 optimizer steps \([0-9.]+ epochs of \d+ steps\), 4 rows per step", proc.stderr)
    lines = re.findall(
        r"step (\d+)/24 \| epoch \d+\.\d\d \| elapsed \d:\d\d:\d\d \| eta \d:\d\d:\d\d \| (.*)", proc.stderr
    )
    assert len(lines) >= 3 and lines[0][0] == "1", proc.stderr[-3000:]
    for step, rest in lines:  # the gates are frozen after the prune event: no gate_grad_norm=0 there
        assert ("gate_grad_norm=" in rest) == (int(step) <= 6), (step, rest)
    # No third-party bars in a log file (each one a line of \r-joined updates), no DCP warning.
    for noise in ("tokenising (", "Loading weights", "\r", "torch.distributed is disabled", "UserWarning"):
        assert noise not in proc.stderr, (noise, proc.stderr[-3000:])

    metrics = [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3  # it learns
    assert any("eval_loss" in m for m in metrics)
    assert list((out / "logs/tensorboard").rglob("events.out.tfevents.*"))

    report = json.loads((out / "report/selection-final.json").read_text())
    assert report["n_kept"] == 5 and report["n_adapters"] == 14
    assert sum(a["gate"] != 0 for a in report["adapters"]) == 5
    assert (out / "report/gates-prune.png").stat().st_size > 5000

    # The adapter is standard peft: it loads without this project and has exactly 5 adapters.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "model"))
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 5
    # Its model card: how it was launched, the data's bytes, the final eval.
    card = (out / "adapter/README.md").read_text()
    digest = hashlib.sha256((tiny_dir / "data/train.jsonl").read_bytes()).hexdigest()[:16]
    final = [m for m in metrics if "eval_loss" in m][-1]["eval_loss"]
    assert "| launcher | one process: `python train.py --config" in card, card
    assert f"{(tiny_dir / 'data/train.jsonl').resolve()}` (" in card and f"sha256 {digest})" in card
    assert f"| final eval loss | {final:.4f} (perplexity" in card
    assert sorted(model.peft_config["default"].target_modules) == sorted(report["kept"])
    with model.disable_adapter(), torch.no_grad():
        plain = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    with torch.no_grad():
        tuned = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert (tuned - plain).abs().max() > 1e-3  # the trained adapters do something


@pytest.fixture(scope="module")
def launched(tiny_dir, tmp_path_factory):
    """The same tiny run through `accelerate launch` (three shipped configs) and the deepspeed launcher."""
    tmp = tmp_path_factory.mktemp("launch")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    runs = {}
    for launch in ("cpu_2proc", "cpu_fsdp2", "cpu_zero3"):
        cfg, out = _write_cfg(tmp, tiny_dir, launch, selection={"steps": 4, "k": 4}, train={"max_steps": 8})
        proc = _run(
            [
                accelerate,
                "launch",
                "--config_file",
                f"launch/accelerate/{launch}.yaml",
                "--main_process_port",
                "0",
                "train.py",
                "--config",
                str(cfg),
                # Activation checkpointing under FSDP2 must not change the math either.
                *(["model.gradient_checkpointing=true"] if launch == "cpu_fsdp2" else []),
            ]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[launch] = (proc, out)
    # HSDP on 4 processes (2 replicas x shard groups of 2), from accelerate's parallelism_config.
    cfg, out = _write_cfg(tmp, tiny_dir, "cpu_hsdp", selection={"steps": 4, "k": 4}, train={"max_steps": 8})
    hsdp = ["--config_file", "launch/accelerate/cpu_hsdp.yaml", "--main_process_port", "0"]
    proc = _run([accelerate, "launch", *hsdp, "train.py", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs["cpu_hsdp"] = (proc, out)
    # The deepspeed launcher (it passes --local_rank to the script), ZeRO-2 from the command line.
    cfg, out = _write_cfg(tmp, tiny_dir, "deepspeed", selection={"steps": 4, "k": 4}, train={"max_steps": 8})
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = _run(
        [
            deepspeed,
            "--num_gpus",
            "2",
            "--master_port",
            str(_free_port()),
            "train.py",
            "--config",
            str(cfg),
            "distributed.backend=zero",
            "distributed.zero.stage=2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs["deepspeed"] = (proc, out)
    return runs


@pytest.mark.parametrize(
    ("launch", "backend"),
    [("cpu_2proc", "replicated"), ("cpu_fsdp2", "fsdp2"), ("cpu_zero3", "zero3"), ("deepspeed", "zero2")],
)
def test_accelerate_launch_runs_the_configured_backend_on_two_processes(launched, launch, backend):
    proc, out = launched[launch]
    assert f"world_size=2 backend={backend} " in proc.stderr, proc.stderr[-3000:]
    # Rank 0 tokenised once; rank 1 read its copy (no second tokenising, no warning).
    assert proc.stderr.count("tokenised data: ") == 1 and "cannot see rank 0's" not in proc.stderr
    # Known third-party noise is filtered at its source (ZeRO-3's collectives warned hundreds of times).
    assert "FutureWarning" not in proc.stderr and "built successfully" not in proc.stdout + proc.stderr
    # Without a terminal (as under SLURM): the run length, then step N/M lines with epoch,
    # elapsed and ETA; no third-party bar (each one a \r-joined line in a file), once per rank.
    assert re.search(r"run length: 8 optimizer steps \([0-9.]+ epochs of \d+ steps\), 8 rows per step", proc.stderr)
    assert re.search(r"step 8/8 \| epoch \d+\.\d\d \| elapsed \d:\d\d:\d\d \| eta 0:00:00 \| loss=", proc.stderr)
    assert "\r" not in proc.stderr and "Loading weights" not in proc.stderr
    # The model card names the launcher with its command line.
    card = (out / "adapter/README.md").read_text()
    launcher = "the deepspeed launcher: `deepspeed --num_gpus 2" if launch == "deepspeed" else "accelerate launch: `"
    assert f"| launcher | {launcher}" in card and "--config_file" * (launch != "deepspeed") in card, card
    assert "kept 4 adapters" in proc.stdout
    assert (out / "adapter/adapter_model.safetensors").exists()
    report = json.loads((out / "report/selection-final.json").read_text())
    assert report["backend"] == backend and report["world_size"] == 2
    per_rank = report["memory_per_rank"]
    assert [r["global_rank"] for r in per_rank] == [0, 1]
    for r in per_rank:  # every rank's optimizer state shrank at the prune event, and it was timed
        assert r["after"]["optimizer_state_bytes"] < r["before"]["optimizer_state_bytes"]
        assert r["prune_seconds"] > 0


def test_an_accelerate_parallelism_config_runs_hsdp(launched):
    proc, out = launched["cpu_hsdp"]
    assert "world_size=4 backend=fsdp2 mesh=2x2 (replicas x shard group)" in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "report/selection-final.json").read_text())
    assert report["mesh"] == [2, 2] and report["world_size"] == 4
    fsdp2 = json.loads((launched["cpu_fsdp2"][1] / "report/selection-final.json").read_text())
    # Each rank holds half the base, as each of the 2 FSDP2 ranks does (not a quarter).
    held = [sum(r["base_bytes"].values()) for r in report["memory_per_rank"]]
    half = max(sum(r["base_bytes"].values()) for r in fsdp2["memory_per_rank"])
    assert all(abs(h - half) <= 0.02 * half for h in held), (held, half)
    assert (out / "adapter/adapter_model.safetensors").exists()


def test_exported_adapter_is_the_full_trained_tensor_under_every_backend(launched):
    """Sharded backends gather the full adapter before writing it (no empty ZeRO-3 shards)."""
    from safetensors.torch import load_file

    ref = load_file(str(launched["cpu_2proc"][1] / "adapter/adapter_model.safetensors"))
    assert len(ref) == 8 and all(t.numel() > 0 for t in ref.values())
    for launch in ("cpu_fsdp2", "cpu_zero3", "deepspeed"):
        got = load_file(str(launched[launch][1] / "adapter/adapter_model.safetensors"))
        assert got.keys() == ref.keys(), launch
        for key, tensor in ref.items():
            assert got[key].shape == tensor.shape, (launch, key)
            torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-5, msg=f"{launch} {key}")


def test_existing_adapter_is_never_overwritten(tmp_path, tiny_dir):
    cfg, out = _write_cfg(tmp_path, tiny_dir)
    (out / "adapter").mkdir(parents=True)
    (out / "adapter/adapter_model.safetensors").write_bytes(b"precious")
    proc = _run([sys.executable, "train.py", "--config", str(cfg)])
    assert proc.returncode == 1
    assert "already holds an adapter" in proc.stderr and "output.overwrite=true" in proc.stderr
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == b"precious"


def test_missing_model_path_is_a_clear_error(tmp_path, tiny_dir):
    cfg, _ = _write_cfg(tmp_path, tiny_dir)
    proc = _run([sys.executable, "train.py", "--config", str(cfg), "model.path=./no/such/model"])
    assert proc.returncode == 1
    assert "model.path='./no/such/model': no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_config_fields():
    proc = _run([sys.executable, "train.py", "--help"])
    assert proc.returncode == 0
    assert "selection.lr_w" in proc.stdout and "key.sub=value" in proc.stdout


def test_wrong_column_is_a_clear_error_before_training(tmp_path, tiny_dir):
    cfg, out = _write_cfg(tmp_path, tiny_dir)
    proc = _run([sys.executable, "train.py", "--config", str(cfg), "data.text_field=body"])
    assert proc.returncode == 1  # found by the preflight (its first rows read before anything loads)
    assert "column 'body' (data.text_field) not in the data" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "adapter").exists()
