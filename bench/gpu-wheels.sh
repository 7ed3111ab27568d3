#!/usr/bin/env bash
# Wheels for the GPU run (bench/gpu.sh): what ptserve needs that the device image lacks. Its Python is 3.12
# and it has torch 2.11, transformers 5.17 (ptserve pins 5.24: carried), accelerate, prometheus-client,
# tokenizers, safetensors, and pytest with what it needs (both calls of 2026-11-27 ran the tests with them).
# Run here, in the repository root, where the package registry is reachable; the device call carries .whl.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl \
    litserve==0.2.19 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 pyzmq==27.3.0 bitsandbytes==0.50.2 llguidance==1.9.1 \
    opentelemetry-api==1.45.2 transformers==5.24.0 regex==2026.11.19
# bitsandbytes ships a library for each CUDA and ROCm release (123 MB unpacked): keep the CPU's and CUDA 13's
# (the device's torch is built for CUDA 13.0), so that the wheels and the tree fit the call's 64 MiB
python3 - .whl/bitsandbytes-*.whl <<'PY'
import sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist()]
def keep(name):
    return "libbitsandbytes_" not in name or "_cpu" in name or "_cuda13" in name
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in items:
        if info.filename.endswith("RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if keep(line.split(",")[0])).encode()
        if keep(info.filename):
            dst.writestr(info, data)
PY
du -sh .whl
