"""One device call: every step in order of value, inside one time budget, into at most 8
files. benchmarks/gpu/run.sh installs the carried wheels and starts this:

    bash benchmarks/gpu/run.sh                       # the call: STEPS below, until the budget ends
    bash benchmarks/gpu/run.sh env smoke 70b-nf4-ws8 # chosen steps (a second call: the summary
                                                     # names the steps that did not fit)
    bash benchmarks/gpu/run.sh real-llm-full         # the real-model table in full (docs/method.md),
                                                     # where the converted model is (make real-model)
    WLORA_GPU_STANDIN=1 bash benchmarks/gpu/run.sh   # the same steps on CPU, tiny stand-in modes

Steps: env (versions, the GPU), smoke (benchmarks/gpu/smoke.py: bitsandbytes on the device,
DeepSpeed, NCCL, the bf16 matmul peak), checks (pytest -m gpu tests/test_gpu.py, each check
bounded), then modes of benchmarks/compare.py ("8b", "8b+compile:cd": configurations c and
d with train.compile), (a) first in each so a mode cut short still holds a ratio. Each step
has its own limit (LIMITS; WLORA_GPU_LIMITS="checks=60,8b=100" overrides) and none runs
past the budget (BUDGET_S, default 540 s from run.sh's start): a step stopped by its limit
is recorded and the next one starts.

Files in $OUT (no sub-folder; a device call brings back at most 8, 2 folders down):
    summary.md     the tables, rewritten after every step; written last and printed last
    results.jsonl  one line per smoke item, check, measured margin and configuration, as each ended
    call.log       everything the steps printed (run.sh's install included)
    env.txt        versions and the GPU
    more.tar.gz    each mode's results.json / .md / .png / partial.jsonl
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import summary as summary_mod  # noqa: E402

# The call, in order of value: correctness, the 8B comparison, the 4-bit and 8-bit bases at
# 1B and at 70B (rank 0 of 8), train.compile and liger-kernel, then what earlier calls
# measured already.
STEPS = [
    "env",
    "smoke",
    "checks",
    "8b",
    "1b-nf4",
    "70b-nf4-ws8",
    "1b-int8",
    "70b-int8-ws8",
    "8b+compile:cd",
    "8b+liger:cd",
    "8b+compile+liger:cd",
    "8b-48gb",
    "8b-fsdp2:c",
    "8b-zero3:c",
    "70b-bf16-ws8",
]
# Seconds each step may take at most (a mode: per configuration, times its configurations).
LIMITS = {"env": 30, "smoke": 120, "checks": 240, "real-llm-full": 540}
# benchmarks/real_llm.py --full (300 steps, 5 seeds, 4 rates): not in STEPS (it needs a call of
# its own) and only where the converted model is: the lent machine's 64 MiB carry cannot take
# the 98 MB model wheel, so there it is recorded as not run.
REAL_MODEL = ROOT / "runs" / "bench-cache" / "smollm2-135m-instruct"
CONFIG_LIMIT = {"70b": 200, "8b": 120, "1b": 90}  # by the mode name's first part
STANDIN_CONFIG_LIMIT = 60
# The stand-in's checks: the ones that are cheap on CPU (a two-layer model, no process launched).
STANDIN_CHECKS = "int8_logits or nf4_weights"
RESERVE_S = 10  # of the budget, kept for the summary and the tar


@dataclass
class Call:
    out: Path
    deadline: float  # time.time() by which everything is written
    standin: bool
    limits: dict[str, float] = field(default_factory=dict)
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="wlora-call-")))
    steps: list[dict] = field(default_factory=list)  # what each step did: name, outcome, seconds

    @property
    def results(self) -> Path:
        return self.out / "results.jsonl"

    @property
    def log(self) -> Path:
        return self.out / "call.log"

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, line: dict) -> None:
        with open(self.results, "a") as f:
            f.write(json.dumps(line) + "\n")

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log, "a") as f:
            f.write(text + "\n")

    def limit(self, step: str) -> float:
        """The most a step may take: its own limit, or a mode's per configuration times its
        configurations."""
        if step in self.limits:
            return self.limits[step]
        if step in LIMITS:
            return LIMITS[step]
        return self.config_limit(step) * len(parse_mode_step(step)[1])

    def config_limit(self, step: str) -> float:
        if self.standin:
            return STANDIN_CONFIG_LIMIT
        return CONFIG_LIMIT.get(step.split("-")[0].split("+")[0], 150)


def parse_mode_step(step: str) -> tuple[str, str]:
    """ "8b+compile:cd" -> ("8b+compile", "cd"); no ":" -> "abcd" (and e where the mode has a
    budget to re-plan under)."""
    from benchmarks.compare import mode_for

    spec, _, configs = step.partition(":")
    if not configs:
        mode = mode_for(spec)
        configs = "abcde" if mode.checkpointing and mode.budget_gib else "abcd"
    return spec, configs


# ---------------------------------------------------------------- the steps


def run_command(call: Call, cmd: list[str], limit: float, env: dict | None = None) -> tuple[str, str]:
    """``cmd`` with its output appended to call.log, in a session of its own so that its
    whole process tree (torchrun's ranks) dies at the limit: (outcome, stdout)."""
    with open(call.log, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})}, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            log.write(out or "")
            return "timeout", out or ""
        log.write(out or "")
    return ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), out


def step_env(call: Call, limit: float) -> str:
    code = (
        "import importlib, platform, torch\n"
        "print('python', platform.python_version())\n"
        "for m in ('torch', 'transformers', 'peft', 'accelerate', 'deepspeed', 'bitsandbytes', 'datasets',"
        " 'triton', 'liger_kernel'):\n"
        "    try: print(m, getattr(importlib.import_module(m), '__version__', '?'))\n"
        "    except Exception as e: print(m, 'MISSING', type(e).__name__)\n"
        "if torch.cuda.is_available():\n"
        "    print('cuda', torch.version.cuda, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())),"
        " torch.cuda.get_device_name(0))\n"
        "else: print('cuda: none')\n"
    )
    outcome, out = run_command(call, [sys.executable, "-c", code], limit)
    smi = shutil.which("nvidia-smi")
    gpu = ""
    if smi:
        with contextlib.suppress(Exception):
            q = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            gpu = subprocess.run([smi, *q], capture_output=True, text=True, timeout=20).stdout.strip()
    text = f"nvidia-smi: {gpu or 'none'}\n{out}{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
    (call.out / "env.txt").write_text(text)
    versions = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    call.record({"kind": "env", "gpu": gpu or None, "standin": call.standin, **versions})
    return outcome


def step_smoke(call: Call, limit: float) -> str:
    device = "cpu" if call.standin else "cuda"
    outcome, out = run_command(call, [sys.executable, "-m", "benchmarks.gpu.smoke", "--device", device], limit)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    for line in lines:
        call.record(line)
    if outcome == "ok" and not all(x["ok"] for x in lines):
        outcome = "failed: " + ", ".join(x["name"] for x in lines if not x["ok"])
    return outcome


def step_checks(call: Call, limit: float) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.gpu.pytest_lines"]
    cmd += ["-m", "gpu", "tests/test_gpu.py", "-rA"]
    if call.standin:
        cmd += ["-k", STANDIN_CHECKS]
    env = {
        "WLORA_GPU_RESULTS": str(call.results),
        "WLORA_GPU_REPORT": str(call.results),
        # Each check bounded on its own, within what the step has.
        "WLORA_GPU_TEST_TIMEOUT": str(int(max(10, min(150, limit - 5)))),
    }
    if call.standin:
        env["WLORA_GPU_STANDIN"] = "1"
    outcome, _ = run_command(call, cmd, limit, env)
    return {"exit 1": "some checks failed"}.get(outcome, outcome)


def step_real_llm(call: Call, limit: float, model: Path = REAL_MODEL) -> str:
    """The real-model table in full (benchmarks/real_llm.py --full) on the device; its
    real_llm.json / .md / .png and partial.jsonl go into more.tar.gz. The study resumes from
    partial.jsonl, so a call cut by its limit is continued by the next one."""
    if not (model / "config.json").is_file():
        return (
            f"not run: no converted model at {model} (make real-model; the 98 MB wheel is over "
            "the lent machine's 64 MiB carry)"
        )
    out = ROOT / "runs" / "real-llm-full"  # kept between calls on the same machine: the study resumes
    device = "cpu" if call.standin else "cuda"
    cmd = [sys.executable, "-m", "benchmarks.real_llm", "--full", "--device", device, "--out", str(out)]
    cmd += ["--model", str(model)]
    outcome, _ = run_command(call, cmd, limit)
    (call.work / "real-llm-full").mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.*"):  # the results and partial.jsonl, for more.tar.gz
        shutil.copy2(f, call.work / "real-llm-full" / f.name)
    return outcome


def step_mode(call: Call, step: str, limit: float) -> str:
    from benchmarks import compare

    spec, configs = parse_mode_step(step)
    if call.standin and "+liger" in spec:
        return "skipped: liger-kernel's kernels need a GPU (triton)"
    per_config = min(call.config_limit(step), limit)
    out = call.work / step.replace(":", "-")

    def on_line(line: dict) -> None:
        call.record({"kind": "configuration", "step": step, **line})
        words = f"error: {line['error'].splitlines()[0]}" if "error" in line else f"{line['tokens_per_s']:,.0f} tok/s"
        call.say(f"   ({line['config']}) {words}")

    try:
        with open(call.log, "a") as log, contextlib.redirect_stderr(log):
            s = compare.compare(
                spec, out, per_config, None, configs, standin=call.standin, deadline=time.time() + limit,
                peak_tflops=call_peak(call), on_line=on_line,
            )  # fmt: skip
    except SystemExit as e:
        return f"failed: {e}"
    call.record({"kind": "mode", "step": step, **{k: v for k, v in s.items() if k != "results"}})
    return "ok" if not s["failed"] else f"{len(s['failed'])} configuration(s) failed"


def call_peak(call: Call) -> float | None:
    """The matmul peak the smoke step measured in this call (TFLOP/s), if it did."""
    for line in read_lines(call.results):
        if line.get("kind") == "smoke" and line.get("name") == "matmul_peak" and line.get("ok"):
            return line["tflops"]
    return None


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for text in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(text))
    return out


# ---------------------------------------------------------------- the call


def run(call: Call, steps: list[str]) -> None:
    for i, step in enumerate(steps):
        left = call.left()
        limit = min(call.limit(step), left)
        if left < 10:
            for rest in steps[i:]:
                call.steps.append({"name": rest, "outcome": "not run: budget", "seconds": 0.0})
                call.record({"kind": "step", **call.steps[-1]})
            break
        call.say(f"== {step} (limit {limit:.0f} s, {left:.0f} s left)")
        t0 = time.time()
        try:
            if step == "env":
                outcome = step_env(call, limit)
            elif step == "smoke":
                outcome = step_smoke(call, limit)
            elif step in ("checks", "tests"):
                outcome = step_checks(call, limit)
            elif step == "real-llm-full":
                outcome = step_real_llm(call, limit)
            else:
                outcome = step_mode(call, step, limit)
        except Exception as e:  # a broken step is recorded; the next one still runs
            outcome = f"error: {type(e).__name__}: {str(e)[:300]}"
        seconds = round(time.time() - t0, 1)
        call.steps.append({"name": step, "outcome": outcome, "seconds": seconds})
        call.record({"kind": "step", "name": step, "outcome": outcome, "seconds": seconds})
        call.say(f"   {step}: {outcome} ({seconds} s)")
        finish(call, final=False)
    finish(call, final=True)


def finish(call: Call, final: bool) -> None:
    """The tar of the modes' files and the summary (last: written after everything else)."""
    with tarfile.open(call.out / "more.tar.gz", "w:gz") as tar:
        for path in sorted(call.work.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(call.work)))
    text = summary_mod.render(read_lines(call.results), call.steps, call.standin)
    (call.out / "summary.md").write_text(text)
    if final:
        print("\n" + text, flush=True)


def parse_limits(text: str) -> dict[str, float]:
    """WLORA_GPU_LIMITS="checks=60,8b=100" -> {"checks": 60.0, "8b": 100.0}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, seconds = item.partition("=")
        out[name] = float(seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    standin = os.environ.get("WLORA_GPU_STANDIN") == "1"
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks/results/gpu")
    out.mkdir(parents=True, exist_ok=True)
    start = float(os.environ.get("WLORA_CALL_START") or time.time())  # run.sh's start: the install counts
    budget = float(os.environ.get("BUDGET_S") or 540)
    call = Call(out, start + budget - RESERVE_S, standin, parse_limits(os.environ.get("WLORA_GPU_LIMITS", "")))
    (out / "results.jsonl").touch()
    install = os.environ.get("WLORA_INSTALL")  # what run.sh did: installed / already installed / failed / none
    if install:
        call.steps.append({"name": "install", "outcome": install, "seconds": round(time.time() - start, 1)})
        call.record({"kind": "step", "name": "install", "outcome": install, "seconds": round(time.time() - start, 1)})
    try:
        run(call, argv or STEPS)
    finally:
        shutil.rmtree(call.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
