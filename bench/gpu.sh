#!/usr/bin/env bash
# The GPU measurement (issues 7 and 12), as one command on the device machine, with `carry: [".whl"]` after
# bench/gpu-wheels.sh ran here:
#     BUDGET_S=540 bash bench/gpu.sh        # the steps below in this order, as many as BUDGET_S seconds allow
#     STEPS="none 4bit" bash bench/gpu.sh   # some of them (a later call on the same warm machine)
# Steps (each is skipped once less than 40 s of BUDGET_S is left, and cut at its own share; 540 s hold
# graphs, none and tests, and engine as far as it gets: the rest need a call of their own,
# STEPS="engine 4bit eager ..."):
#     graphs    bench/engine_step.py --parts graphs: decoding passes replayed from CUDA graphs (the server's
#               default), their capture and pass times at 1/16/64 rows, then the engine's loop with them,
#               each pass launched before the last one's tokens are read (server.async_scheduling), then not
#     engine    bench/engine_step.py: the engine alone, where a decoding pass's time goes (a profile, the
#               rows' grouping for SDPA, prefill chunks, the engine loop's phases, the compiled decode)
#     engine-compiled  the engine's loop with the compiled decode (in ptserve's CUDA graphs) at ENGINE_COMPILED
#               rows (1,16), as the server runs it, in a process of its own
#     tests     the `gpu`-marked tests (tests/test_gpu.py: CUDA graphs, the Triton decode kernel, the varlen
#               kernel, FlashAttention prompt chunks, then the torch.compile ones)
#     none      bench/serve.py on a random-weight model of Phi-3.5-mini's exact shape (7.64 GB in bf16, built
#               on the GPU the first time), 256 prompt / 256 output tokens, at LEVELS streams (1,16,64)
#     eager     the same with server.cuda_graphs off (eager decoding passes)
#     stepwise  the same with server.async_scheduling off (graphs, each pass's tokens read before the next)
#     tools     bench/engine_step.py --parts tools: the engine's loop with every request offered a tool (its
#               grammar's masks each token), passes launched ahead (drawn once the last tokens are read), then not
#     4bit      the same, bitsandbytes-quantized at load (8bit likewise, last)
#     compiled  the same as none with server.compile_decode (inductor's pass compiled once at start, in
#               ptserve's CUDA graphs) at COMPILED_LEVELS
#     multiturn bench/multiturn.py on the same model, ptserve with and without its prefix cache
# Results in $OUT (or bench/out/): gpu-<card>-<step>.json, the tests' and steps' logs and the servers' logs in
# gpu-logs.tgz. bench/serve.py saves after every level, so a step cut short keeps what it measured.
set -uo pipefail
start=$(date +%s)
budget=${BUDGET_S:-540}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # ptserve itself, not installed there
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-bench/out}
dest=$(printf %q "$out")  # quoted: it goes into the steps' command lines
mkdir -p "$out" bench/out
logs=bench/out/gpu-logs
rm -rf $logs  # a warm machine keeps an earlier call's
mkdir -p $logs
# every process this script starts carries the marker; a step's leftovers (servers run in sessions of their
# own, out of `timeout`'s reach) are found by it and killed before the next step
export GPU_BENCH_RUN=$$
leftovers() {
    grep -lzx "GPU_BENCH_RUN=$$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$"
}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-')
card=${card:-cpu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY' 2>&1 | tee $logs/versions.txt
import inspect, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as exc:
    print("no varlen_attn:", exc)
PY

left() { echo $((budget - ($(date +%s) - start))); }
shape=${SHAPE:-phi35}
serve="python3 bench/serve.py --shape $shape --prompt-tokens 256 --max-tokens ${MAX_TOKENS:-256} --peer none --warm-up-levels"
# run NAME SHARE COMMAND: the command under `timeout` (its share, or what is left less 20 s), logged; then any
# server it left behind is stopped (a step cut short leaves one holding the GPU's memory). A failure is printed
# with the end of its log and the servers' logs; the next step runs either way.
run() {
    local name=$1 share=$2 limit t0 rc
    limit=$(left)
    if [ "$limit" -lt 40 ]; then
        echo "== $name: skipped ($limit s left)"
        return
    fi
    limit=$((limit - 20 < share ? limit - 20 : share))
    echo "== $name ($limit s at most, $(left) s left)"
    t0=$(date +%s)
    rm -f bench/out/ptserve*.log bench/out/multiturn-*.log
    timeout -k 10 "$limit" bash -c "$3" >$logs/$name.log 2>&1
    rc=$?
    pids=$(leftovers)
    [ -n "$pids" ] && { kill -9 $pids 2>/dev/null; sleep 3; }
    echo "== $name: rc $rc in $(($(date +%s) - t0)) s"
    grep -E '^  ptserve|passed|failed|skipped|rror|^  [a-z-]+ / |^turn|^(forward|engine|compiled|graphs|profile|model)[ :]|cudagraph|CUDA graph|stay eager|one by one|unusable here|disagrees|Triton' $logs/$name.log | cut -c1-1500 | tail -24
    for f in bench/out/ptserve*.log bench/out/multiturn-*.log; do
        [ -f "$f" ] || continue
        # how the server's engine runs: its start line and any fallback it took
        grep -hE 'decoding passes|Triton|one by one|unusable here|disagrees|stay eager' "$f" | cut -c1-400 | head -4
        cp "$f" "$logs/$name-${f##*/}"
        [ $rc -ne 0 ] && { echo "-- $f"; tail -15 "$f"; }
    done
    [ $rc -ne 0 ] && tail -25 $logs/$name.log
}

logs_compile=perf_hints,recompiles,+torch._inductor.cudagraph_trees  # why graphs are skipped or re-recorded
for step in ${STEPS:-graphs none tests engine 4bit eager stepwise tools multiturn engine-compiled compiled 8bit}; do
    case $step in
        graphs) run graphs 120 "python3 bench/engine_step.py --shape $shape --parts graphs \
            --out $dest/gpu-$card-graphs.json" ;;
        engine) run engine 150 "TORCH_LOGS=$logs_compile python3 bench/engine_step.py --shape $shape \
            --out $dest/gpu-$card-engine.json" ;;
        engine-compiled) run engine-compiled 200 "TORCH_LOGS=$logs_compile python3 bench/engine_step.py \
            --shape $shape --parts engine-compiled --engine-compiled ${ENGINE_COMPILED:-1,16} \
            --out $dest/gpu-$card-engine-compiled.json" ;;
        tests) run tests 150 "python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py" ;;
        none | 4bit | 8bit) run "$step" 200 "$serve --levels ${LEVELS:-1,16,64} --quantization $step \
            --out $dest/gpu-$card-$step.json" ;;
        eager) run eager 200 "PTSERVE_SERVER_CUDA_GRAPHS=false $serve --levels ${LEVELS:-1,16,64} \
            --quantization none --out $dest/gpu-$card-eager.json" ;;
        tools) run tools 150 "python3 bench/engine_step.py --shape $shape --parts tools \
            --out $dest/gpu-$card-tools.json" ;;
        stepwise) run stepwise 200 "PTSERVE_SERVER_ASYNC_SCHEDULING=false $serve --levels ${LEVELS:-1,16,64} \
            --quantization none --out $dest/gpu-$card-stepwise.json" ;;
        compiled) run compiled 180 "TORCH_LOGS=$logs_compile PTSERVE_SERVER_COMPILE_DECODE=true $serve --levels ${COMPILED_LEVELS:-1,16} \
            --quantization none --out $dest/gpu-$card-compiled.json" ;;
        multiturn) run multiturn 150 "python3 bench/multiturn.py --shape $shape --servers ptserve,ptserve-nocache \
            --out $dest/gpu-$card-multiturn.json" ;;
        *) echo "unknown step $step" ;;
    esac
done
tar -czf "$out/gpu-logs.tgz" -C bench/out gpu-logs
echo "== done in $(($(date +%s) - start)) s"
