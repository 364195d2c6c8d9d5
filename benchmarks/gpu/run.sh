#!/usr/bin/env bash
# Run ON the GPU machine, from the repository root, with .gpu-wheels/ beside it (made by
# benchmarks/gpu/prepare.sh on a machine with the package registries):
#
#     bash benchmarks/gpu/run.sh call1               # = env tests 8b         (one 10-minute call)
#     bash benchmarks/gpu/run.sh call2               # = 8b-48gb 8b-fsdp2:c 8b-zero3:c 1b-int8
#     bash benchmarks/gpu/run.sh call3               # = 70b-int8-ws8 70b-bf16-ws8 (fake process group)
#     bash benchmarks/gpu/run.sh call4               # = 1b-nf4 70b-nf4-ws8 (4-bit base)
#     bash benchmarks/gpu/run.sh env tests 8b        # chosen steps, in this order
#
# Every step at once does not fit one 10-minute device call: run the four calls above, one
# call each (no argument = call1). Each leaves a handful of small files in $OUT.
#
# Steps: env (versions, GPU), tests (pytest -m gpu: the correctness checks), and any mode
# of benchmarks/compare.py, optionally with configurations: "8b-fsdp2:c" runs (c) only.
# Results go to $OUT (default benchmarks/results/gpu): env.txt, tests.log,
# gpu_checks.jsonl (what each check measured), <mode>.json (compare.py's results),
# <mode>.partial.jsonl (each configuration's result or error as it ended: what a mode cut
# short by the budget or an out-of-memory still measured), preinstalled.txt, install.txt
# (each carried wheel: installed or why not) and bench.log. Every step is bounded by what is left of BUDGET_S (default 570 s, inside a
# 10-minute call), so a call that runs out still returns what finished.
# Meant for a throwaway GPU machine: it installs the wheels into /tmp/site and this
# checkout (`pip install -e .`) into whatever `python3` is first on the PATH; do not run
# it against the virtual environment of another checkout.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
BUDGET_S=${BUDGET_S:-570}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
bounded() {  # bounded <max seconds> <command...>: at most min(max, what is left - 10 s)
    local max=$1 t
    shift
    t=$(left)
    t=$((t - 10 < max ? t - 10 : max))
    if [ "$t" -lt 20 ]; then echo "skipped (budget): $*" | tee -a "$OUT/bench.log"; return 124; fi
    timeout --signal=TERM --kill-after=10 "$t" "$@"
}

# What the machine has, before anything is installed (a wheel that fails below is then
# still explained by what it found).
python3 - <<'PY' 2>&1 | tee "$OUT/preinstalled.txt"
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "transformers", "accelerate", "peft", "pyarrow"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__)
PY
if [ -d .gpu-wheels ]; then
    # One wheel at a time: one that does not install is reported, and the others still are.
    for whl in .gpu-wheels/*.whl; do
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$whl" >/tmp/pip-one.log 2>&1 \
            && echo "installed $(basename "$whl")" \
            || { echo "FAILED to install $(basename "$whl"):"; tail -3 /tmp/pip-one.log; }
    done 2>&1 | tee "$OUT/install.txt"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}

steps=()
for a in "${@:-call1}"; do
    case $a in
    call1) steps+=(env tests 8b) ;;
    call2) steps+=(8b-48gb 8b-fsdp2:c 8b-zero3:c 1b-int8) ;;
    call3) steps+=(70b-int8-ws8 70b-bf16-ws8) ;;
    call4) steps+=(1b-nf4 70b-nf4-ws8) ;;
    *) steps+=("$a") ;;
    esac
done
for step in "${steps[@]}"; do
    echo "== $step ($(left) s left)" | tee -a "$OUT/bench.log"
    case $step in
    env)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
            python3 - <<'PY'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "triton", "liger_kernel"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), torch.cuda.get_device_name(0))
PY
            date -u +%FT%TZ
        } >"$OUT/env.txt" 2>&1
        cat "$OUT/env.txt"
        ;;
    tests)
        WLORA_GPU_REPORT="$OUT/gpu_checks.jsonl" bounded 300 python3 -m pytest -q -p no:cacheprovider \
            -m gpu tests/test_gpu.py -rA 2>&1 | tee "$OUT/tests.log" | tail -30
        ;;
    *)
        mode=${step%%:*}
        only=abcde
        [[ $step == *:* ]] && only=${step#*:}
        bounded 480 python3 benchmarks/compare.py --mode "$mode" --only "$only" --out "/tmp/bench/$mode" \
            >>"$OUT/bench.log" 2>&1
        rc=$?
        [ -f "/tmp/bench/$mode/results.json" ] && cp "/tmp/bench/$mode/results.json" "$OUT/$mode.json"
        # Each configuration's line as it ended (or its error): kept when the mode is cut short.
        [ -f "/tmp/bench/$mode/partial.jsonl" ] && cp "/tmp/bench/$mode/partial.jsonl" "$OUT/$mode.partial.jsonl"
        [ -f "/tmp/bench/$mode/results.md" ] && cat "/tmp/bench/$mode/results.md"
        [ $rc -ne 0 ] && { echo "$step: exit $rc"; tail -25 "$OUT/bench.log"; }
        ;;
    esac
done
echo "done in $(($(date +%s) - START)) s"
