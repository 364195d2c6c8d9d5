#!/usr/bin/env bash
# The device call. Run ON the GPU machine, from the repository root, with .gpu-wheels/ beside
# it (made by benchmarks/gpu/prepare.sh where the package registries are):
#
#     bash benchmarks/gpu/run.sh                        # everything, in order of value, in ~9 minutes
#     bash benchmarks/gpu/run.sh env smoke 70b-nf4-ws8  # chosen steps (the summary of a call names
#                                                       # what did not fit, as this command)
#     WLORA_GPU_STANDIN=1 bash benchmarks/gpu/run.sh    # the same on CPU, tiny stand-in modes
#
# Installs the carried wheels (one pip run into /tmp/site; skipped when a warm machine has
# them already), puts this checkout on PYTHONPATH (nothing is installed into the image's
# Python) and hands over to benchmarks/gpu/call.py, which runs the steps inside BUDGET_S
# (default 540 s, counted from here: a little under a 10-minute call) and writes at most 8
# files to $OUT (default benchmarks/results/gpu): summary.md (last), results.jsonl,
# call.log, env.txt, more.tar.gz. `python -m benchmarks.gpu.call --help` says more.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-benchmarks/results/gpu}
export BUDGET_S=${BUDGET_S:-540}
export WLORA_CALL_START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
rm -f "$OUT"/summary.md "$OUT"/results.jsonl "$OUT"/call.log "$OUT"/env.txt "$OUT"/more.tar.gz
log="$OUT/call.log"

WLORA_INSTALL=none
if [ "${WLORA_GPU_STANDIN:-0}" != 1 ] && [ -d .gpu-wheels ]; then
    stamp=/tmp/site/.wlora-$(ls .gpu-wheels | md5sum | cut -c1-12)
    if [ -f "$stamp" ]; then
        WLORA_INSTALL="already installed"
    elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpu-wheels/*.whl >>"$log" 2>&1; then
        WLORA_INSTALL=installed
        touch "$stamp"
    else
        # One at a time: which wheel fails is then in call.log, and the others are still there.
        WLORA_INSTALL="failed (see call.log)"
        for whl in .gpu-wheels/*.whl; do
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site "$whl" >>"$log" 2>&1 || echo "FAILED to install $(basename "$whl")" >>"$log"
        done
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
echo "install: $WLORA_INSTALL ($(($(date +%s) - WLORA_CALL_START)) s)" | tee -a "$log"
export WLORA_INSTALL PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec python3 -m benchmarks.gpu.call "$@"
