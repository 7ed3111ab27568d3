#!/usr/bin/env bash
# Issue 7's measurement, as one command on the GPU machine (device tool, with `carry: [".whl"]` after
# bench/gpu-wheels.sh ran here):
#     bash bench/gpu.sh            # all three modes
#     QUANT=none bash bench/gpu.sh # one mode (keep each call inside the 10-minute limit)
#     MULTITURN=1 bash bench/gpu.sh  # then also the multi-turn chat benchmark, cache on and off (issue 12's x5)
# Builds a random-weight model of Phi-3.5-mini's exact shape on the GPU (7.64 GB in bf16), then runs
# the serving benchmark over HTTP: 1, 16 and 64 streams, 256 prompt tokens, 256 output tokens, for
# each quantization mode, with the GPU memory of each. Results: $OUT/gpu-<card>.json (or bench/out/).
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
dest=${OUT:-bench/out}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' || echo cpu)
nvidia-smi || true
# The GPU-only tests first (tests/test_gpu.py: the varlen kernel, CUDA graphs), then the benchmark.
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$dest/gpu-tests.log" || true
python3 bench/serve.py --shape phi35 --prompt-tokens 256 --max-tokens 256 --levels "${LEVELS:-1,16,64}" \
    --quantization "${QUANT:-none,4bit,8bit}" --peer "${PEER:-none}" --out "$dest/gpu-${card:-cpu}.json" \
    2>&1 | tee "$dest/gpu-bench.log"
if [ "${MULTITURN:-0}" = 1 ]; then  # same model (bench/out/phi3.5-shape), ptserve with and without its cache
    python3 bench/multiturn.py --shape phi35 --servers ptserve,ptserve-nocache \
        --out "$dest/multiturn-gpu-${card:-cpu}.json" 2>&1 | tee "$dest/gpu-multiturn.log"
fi
