#!/usr/bin/env bash
# Run HERE (a machine with the package registries), from the repository root:
#     bash benchmarks/gpu/prepare.sh
# Downloads every wheel the GPU image lacks for this project into .gpu-wheels/ (ignored by
# git, < 64 MiB so a device call can carry it). benchmarks/gpu/run.sh installs them there.
#
# The GPU image (python 3.12, torch 2.11 cu130) already has torch, accelerate, peft,
# transformers, triton, numpy, pandas, pyarrow, msgpack, ninja, py-cpuinfo, psutil,
# huggingface_hub. It lacks deepspeed, bitsandbytes, datasets (+ dill, multiprocess,
# xxhash), hjson, pydantic; transformers and peft are brought too. Every version is the one
# installed in the environment the CPU suite passed in (VENV_PY, default .venv/bin/python,
# made by `make setup`), so the GPU checks test the same code the suite tested. liger-kernel
# (pure Python, triton kernels: the +liger benchmark variants) is not in that environment,
# since nothing on CPU can run it: its version is pinned here (LIGER).
set -euo pipefail
OUT=${1:-.gpu-wheels}
PY=${PYTHON:-python3}
rm -rf "$OUT" && mkdir -p "$OUT"
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps)
for n in 17 24 27 28 31 34 35; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
VENV_PY=${VENV_PY:-.venv/bin/python}
[ -x "$VENV_PY" ] || { echo "no $VENV_PY: run 'make setup' first (its versions are the ones carried)" >&2; exit 1; }
pins=$("$VENV_PY" - <<'PYEOF'
import importlib.metadata as md
names = ["bitsandbytes", "datasets", "dill", "multiprocess", "xxhash", "hjson", "pydantic", "pydantic-core",
         "annotated-types", "typing-inspection", "typing-extensions", "peft", "transformers", "fsspec", "deepspeed"]
print(" ".join(f"{n}=={md.version(n)}" for n in names))
PYEOF
)
LIGER=${LIGER:-liger-kernel==0.8.5}
echo "carrying the suite's versions: $pins, and $LIGER"
ds_pin=$(tr ' ' '\n' <<<"$pins" | grep '^deepspeed==')
$PY -m pip download -q "${PLAT[@]}" -d "$OUT" $(tr ' ' '\n' <<<"$pins" | grep -v '^deepspeed==') "$LIGER"
# deepspeed ships only a source distribution: build a pure-Python wheel (its CUDA ops are
# JIT-built on first use; wlora_dist uses torch's Adam, so none is built).
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$ds_pin" \
    || DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$OUT" "$ds_pin"
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
