#!/usr/bin/env bash
# Run HERE (a machine with the package registries), from the repository root:
#     bash benchmarks/gpu/prepare.sh
# Downloads every wheel the GPU image lacks for this project into .gpu-wheels/ (ignored by
# git, < 64 MiB so a device call can carry it). benchmarks/gpu/run.sh installs them there.
#
# The GPU image (python 3.12, torch 2.11 cu130) already has torch, accelerate, peft,
# transformers, triton, numpy, pandas, pyarrow, msgpack, ninja, py-cpuinfo, psutil,
# huggingface_hub. It lacks deepspeed, bitsandbytes, datasets (+ dill, multiprocess,
# xxhash), hjson, pydantic, liger-kernel; transformers and peft are pinned to the versions
# the CPU suite runs so the GPU checks test the same code.
set -euo pipefail
OUT=${1:-.gpu-wheels}
PY=${PYTHON:-python3}
rm -rf "$OUT" && mkdir -p "$OUT"
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps)
for n in 17 24 27 28 31 34 35; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
$PY -m pip download -q "${PLAT[@]}" -d "$OUT" \
    bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
    "typing-extensions>=4.16" peft==0.21.2 transformers==5.24.0 liger-kernel==0.8.5 \
    "fsspec<=2026.9.0"
# deepspeed ships only a source distribution: build a pure-Python wheel (its CUDA ops are
# JIT-built on first use; wlora_dist uses torch's Adam, so none is built).
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8 \
    || DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$OUT" deepspeed==0.19.8
# bitsandbytes' wheel carries a library per CUDA version (123 MiB unpacked): keep the
# CUDA 13 ones the image's torch uses and the CPU one, so the folder stays carryable.
bnb=$(ls "$OUT"/bitsandbytes-*.whl)
$PY - "$bnb" <<'PYEOF'
import re, sys, zipfile, os
src = sys.argv[1]
tmp = src + ".tmp"
drop = re.compile(r"bitsandbytes/libbitsandbytes_cuda1[12]\d\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop.search(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):  # drop the removed files' lines
            data = b"\n".join(l for l in data.split(b"\n") if not drop.search(l.split(b",")[0].decode()))
        zout.writestr(item, data)
os.replace(tmp, src)
PYEOF
du -sh "$OUT"; ls "$OUT"
