#!/usr/bin/env bash
# Wheels for issue 7's GPU run: what ptserve needs that the device image lacks (its Python is 3.12 and it
# has torch 2.11, transformers 5.17, accelerate, prometheus-client, tokenizers, safetensors). Run here, in
# the repository root, where the package registry is reachable; the device call carries .whl.
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
    opentelemetry-api==1.45.2 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
du -sh .whl
