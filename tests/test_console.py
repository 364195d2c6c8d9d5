"""What the console shows: log lines never glued to the progress bar, the kept set named
at the prune event, known third-party noise dropped at its source."""

import io
import logging

import pytest
from tqdm import tqdm

from wlora_dist.method.weight_lora import AdapterSite
from wlora_dist.noise import silence_known_noise
from wlora_dist.training.report import compact_sites
from wlora_dist.training.tracking import TqdmLineHandler


def test_log_lines_start_on_their_own_line_while_a_bar_is_shown():
    stream = io.StringIO()
    bar = tqdm(total=10, file=stream, disable=False, dynamic_ncols=False, ncols=60, mininterval=0)
    logger = logging.getLogger("wlora_dist.test_console")
    logger.handlers[:] = [TqdmLineHandler(stream)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for i in range(3):
        bar.update(1)
        logger.info("step %d | loss=1.0", i)
    bar.close()
    lines = stream.getvalue().replace("\r", "\n").split("\n")
    logged = [ln for ln in lines if "| loss=1.0" in ln]
    assert len(logged) == 3 and all(ln.startswith("step ") for ln in logged), lines


def test_the_kept_set_is_named_compactly_by_layer():
    sites = [
        AdapterSite(0, "lm_head", None, "lm_head"),
        AdapterSite(1, "model.layers.3.mlp.up_proj", 3, "up_proj"),
        AdapterSite(2, "model.layers.0.self_attn.o_proj", 0, "o_proj"),
        AdapterSite(3, "model.layers.0.self_attn.q_proj", 0, "q_proj"),
    ]
    assert compact_sites(sites) == "L0 q,o | L3 up | lm_head"
    assert compact_sites([]) == "none"


def test_known_third_party_noise_is_dropped_and_real_warnings_kept():
    silence_known_noise()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    ds, bnb = logging.getLogger("DeepSpeed"), logging.getLogger("bitsandbytes.backends.cpu.ops")
    handler = Keep(level=logging.WARNING)
    for lg in (ds, bnb):
        lg.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        ds.warning("a real DeepSpeed warning")
    finally:
        for lg in (ds, bnb):
            lg.removeHandler(handler)
    assert seen == ["a real DeepSpeed warning"]


@pytest.mark.inprocess
def test_the_adapter_folder_is_a_finished_peft_adapter_with_a_model_card(tiny_dir, tmp_path, monkeypatch):
    import json
    import os

    from .helpers import train_in_process

    monkeypatch.chdir(tiny_dir)  # the model given as a relative path, as users often do
    _, result = train_in_process(
        tiny_dir, tmp_path, model={"path": "model"}, train={"max_steps": 3}, selection={"steps": 2, "k": 3}
    )
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["inference_mode"] is True
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_dir / "model")
    card = (result.adapter_dir / "README.md").read_text()
    assert "3 of 14 LoRA adapters kept" in card and f"base_model: {config['base_model_name_or_path']}" in card
    assert all(f"`{m}`" in card for m in config["target_modules"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(result.adapter_dir)
    )
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 3


def test_tracker_tags_are_namespaced_and_jsonl_stays_flat():
    from wlora_dist.training.tracking import namespaced

    tags = namespaced({"loss": 1.0, "eval_loss": 2.0, "gate_grad_norm": 0.1, "kept": 5, "lr": 1e-3})
    assert tags == {
        "train/loss": 1.0,
        "eval/loss": 2.0,
        "selection/gate_grad_norm": 0.1,
        "selection/kept": 5,
        "train/lr": 1e-3,
    }


@pytest.mark.launched
def test_a_reader_that_leaves_early_is_not_reported_as_a_disk_error():
    """`wlora-dist plan ... | head -2`: the pipe closes; the command exits 141 (as a shell
    reports SIGPIPE) and says nothing, not "check that the folder exists"."""
    import subprocess
    import sys

    from .helpers import start, stop

    cmd = [
        sys.executable,
        "-m",
        "wlora_dist.cli",
        "plan",
        "--model",
        "llama3-70b",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
    ]
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.close()
        assert proc.wait(timeout=120) == 141
        assert proc.stderr.read() == b""
    finally:
        stop(proc)


def test_mlflow_schema_lines_and_the_one_process_dcp_warning_are_dropped(tmp_path, monkeypatch, capfd):
    import warnings

    from wlora_dist.config import LogConfig
    from wlora_dist.training.tracking import RunLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    silence_known_noise()
    logger = RunLogger(LogConfig(trackers=["mlflow"], every=1), tmp_path / "logs", 2, True, {"a": 1})
    logger.step(1, {"loss": 1.0}, {})
    logger.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_known_noise()
        warnings.warn("torch.distributed is disabled, unavailable or uninitialized, ...", UserWarning, stacklevel=1)
    out, err = capfd.readouterr()
    assert "Creating initial MLflow database tables" not in out + err
    assert (tmp_path / "logs/mlflow.db").is_file() and not caught


@pytest.mark.launched
def test_commands_that_load_or_write_models_print_no_bar_lines_into_a_log_file(tmp_path):
    """`wlora-dist make-tiny` with its output in a file (no terminal): transformers' bar for
    writing the shards would be a line of \\r-joined updates; none is printed."""
    import sys

    from .helpers import run_command

    cmd = [sys.executable, "-m", "wlora_dist.cli", "make-tiny", "--out", str(tmp_path / "t"), "--rows", "20"]
    proc = run_command([*cmd, "--hidden", "16", "--layers", "1"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "t/model/config.json").is_file() and (tmp_path / "t/data/train.jsonl").is_file()
    assert "\r" not in proc.stderr and "Writing model shards" not in proc.stderr, proc.stderr
    # config --check reads and tokenises every row: no datasets bar in its log either.
    import yaml

    from .conftest import tiny_config_dict

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "t", tmp_path / "run")))
    proc = run_command([sys.executable, "-m", "wlora_dist.cli", "config", "--check", str(cfg)], timeout=300)
    assert proc.returncode == 0 and ": ok (" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "examples/s" not in proc.stderr, proc.stderr
