"""The engine alone, no HTTP: where a decoding pass's time goes, on a GPU above all (bench/gpu.sh runs it).

For each number of rows B (--levels):
- `forward`: one decoding pass (the model's forward through the paged attention, no sampling) at B rows
  of --context tokens, timed over --passes passes after warm-up (synchronized): eager as the engine runs
  it (on a GPU: RMSNorm and the rotation fused; without the varlen kernel, the Triton kernel reading the
  pool in place, where its start-up check passed), then with transformers' own RMSNorm and rotation (each
  alone), with the rows gathered for SDPA in one
  call, and, with --groups, that many at a time (paged.GPU_GROUP; the CPU's GROUP);
- `prefill` (--chunks N,...): a pass computing N prompt tokens of one row from position 0, alone and with
  --riders decoding rows of --context tokens beside it, as the engine schedules a joining prompt
  (server.prefill_chunk_tokens sets N): what a chunk costs the streams already running;
- `engine`: B requests of --prompt random tokens, --tokens greedy tokens each, through Engine.submit (the
  scheduler, sampling and streams included): inter-token time per stream (median), tokens/s and the host
  time of each phase of a pass (`Phases`: on a GPU, where the host waits for it);
- `profile` (--profile B,...): torch.profiler over a few eager passes: the wall time a pass takes against the
  GPU's busy time (a pass the host cannot launch fast enough shows a GPU mostly idle) and the top operators;
- `compiled` (--compiled B,...): the same forward through the compiled decode (server.compile_decode: on
  CUDA inductor's pass, rows and blocks symbolic, compiled once at start, replayed from ptserve's CUDA
  graphs; on a CPU compiled per bucket), called as the engine calls it: start and first-call times, ms a
  pass, and torch's counters.
  TORCH_LOGS=perf_hints,recompiles,+torch._inductor.cudagraph_trees says why graphs are skipped, shapes
  recompiled or graphs re-recorded;
- `engine-compiled` (--engine-compiled B,...): the `engine` measurement with server.compile_decode, the
  compiled decode called from the engine's thread as in the server;
- `graphs` (--graphs B,...): decoding passes replayed from CUDA graphs (server.cuda_graphs, graphs.py) at B
  rows of --context tokens: the capture's time, ms a pass (inputs packed and copied in, the replay), then the
  `engine` measurement with them (on a CPU: the same static buffers run eagerly), each pass launched before
  the last one's tokens are read (server.async_scheduling), then (`engine_stepwise`) read one by one;
- `tools` (at the --graphs levels): the `engine` measurement with every request offered a tool, as an agent
  client's are (its grammar, tool_choice "auto": the model may answer in text or call it; masks from
  llguidance each token), with CUDA graphs, launched ahead (the pass's tokens drawn once the last ones are
  read and the masks made) and then read one by one (`tools_stepwise`).
--parts picks them (bench/gpu.sh runs `engine-compiled` in a process of its own: a compile per process).

A random-weight model of the --shape (bench/serve.py's shapes) is made in memory (the server's dtype):
nothing is written. On a CPU, time `engine` in a run of its own (--parts engine): the other parts run on
this thread, and once two threads have run OpenMP work every parallel region waits for the other team's
threads to wake (ptserve.worker.on_engine_thread; a decoding step ~1.8x as long).
A benchmark, not a test: nothing here asserts time. JSON with --out."""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit, write_json  # noqa: E402
from bench.serve import SHAPES, machine  # noqa: E402
from ptserve.engine import paged, rmsnorm, rope  # noqa: E402
from ptserve.engine.paged import PagedBatch  # noqa: E402
from ptserve.engine.sampling import SamplingParams  # noqa: E402
from ptserve.engine.scheduler import Engine  # noqa: E402
from ptserve.tinymodel import TinyShape, random_model  # noqa: E402


def make_model(shape: str, device: torch.device):
    from ptserve.engine.loader import cpu_has_fast_bf16

    dtype = torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32  # `dtype: auto`
    model = random_model(TinyShape(**SHAPES[shape]), device.type, dtype).eval()
    rope.pin_longrope(model, 4096)
    if device.type == "cuda":  # as the loader does
        rmsnorm.fuse(model)
        rope.fuse_rotary()
        rope.triton_works(device, dtype, *paged.attention_heads(model.config))
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_inputs(engine: Engine, rows: int, context: int, gen: torch.Generator):
    """A decoding pass's tensors: `rows` rows of `context` tokens each, their blocks picked from the pool."""
    bs = engine.block_size
    width = -(-context // bs)
    width = 1 << (width - 1).bit_length()  # the compiled step's bucket of blocks
    owned = torch.tensor(engine.blocks.allocate(rows * -(-context // bs)))
    tables = torch.zeros((rows, width), dtype=torch.long)
    per = -(-context // bs)
    for r in range(rows):
        tables[r, :per] = owned[r * per : (r + 1) * per]
    lens = torch.full((rows,), context)
    positions = lens - 1
    slots = tables.gather(1, (positions // bs).unsqueeze(1)).squeeze(1) * bs + positions % bs
    ids = torch.randint(100, 30000, (1, rows), generator=gen)
    return [t.to(engine.device) for t in (ids, positions.unsqueeze(0), slots, tables, lens)], owned.tolist()


def time_passes(step, args, passes: int, device) -> float:
    with torch.inference_mode():
        for _ in range(3):
            step(*args)
        sync(device)
        start = time.perf_counter()
        for _ in range(passes):
            step(*args)
        sync(device)
    return 1000 * (time.perf_counter() - start) / passes


def profile(engine: Engine, args, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    passes = 5
    with torch.inference_mode():
        engine._decode_step(*args)
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(passes):
                engine._decode_step(*args)
            sync(device)
            wall = 1000 * (time.perf_counter() - start) / passes
    events = prof.key_averages()
    on_device = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000 / passes
    top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0) or e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms_per_pass": round(wall, 2),
        "device_busy_ms_per_pass": round(on_device, 2),
        "kernels_per_pass": sum(e.count for e in events if getattr(e, "self_device_time_total", 0)) // passes,
        "top": [
            {
                "op": e.key[:80],
                "calls_per_pass": e.count // passes,
                "device_ms": round(getattr(e, "self_device_time_total", 0) / 1000 / passes, 3),
                "cpu_ms": round(e.self_cpu_time_total / 1000 / passes, 3),
            }
            for e in top[:14]
        ],
    }


async def generate(
    engine: Engine, rows: int, prompt: int, tokens: int, gen: torch.Generator, grammar: str | None = None
) -> dict:
    async def one(ids):
        first = last = None
        count = 0
        async for out in engine.submit(ids, SamplingParams(tokens, temperature=0.0, grammar=grammar)):
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(out.token_ids)
        return first, last, count

    jobs = [torch.randint(100, 30000, (prompt,), generator=gen).tolist() for _ in range(rows)]
    start = time.perf_counter()
    results = await asyncio.gather(*(one(ids) for ids in jobs))
    wall = time.perf_counter() - start
    itl = [(b - a) / (n - 1) for a, b, n in results if n > 1]
    total = sum(n for _, _, n in results)
    return {"tok_per_s": round(total / wall, 1), "itl_p50_ms": round(1000 * statistics.median(itl), 2), "tokens": total}


PARTS = ("forward", "profile", "prefill", "engine", "compiled", "engine-compiled", "graphs", "tools")


def prefill_pass(engine: Engine, chunk: int, riders: int, args, gen: torch.Generator, device) -> float:
    """ms of an eager pass: `chunk` prompt tokens of a row from position 0 and one token of each of
    `riders` rows holding --context tokens (what `Engine._pass` gives the model for such a plan)."""
    bs = engine.block_size
    owned = engine.blocks.allocate(-(-chunk // bs) + riders * -(-args.context // bs))
    per = -(-args.context // bs)
    prompt_blocks, rest = owned[: -(-chunk // bs)], owned[-(-chunk // bs) :]
    rows = [(0, chunk, prompt_blocks)] + [(args.context - 1, 1, rest[r * per : (r + 1) * per]) for r in range(riders)]
    ids = torch.randint(100, 30000, (1, chunk + riders), generator=gen).to(device)
    positions = torch.tensor([[*range(chunk), *[args.context - 1] * riders]], device=device)

    def step():
        batch = PagedBatch.build(engine.pool, rows, engine.use_varlen)
        engine._forward(batch, ids, positions, True)

    try:
        return time_passes(step, (), max(3, args.passes // 4), device)
    finally:
        engine.blocks.release(owned)


def run_engine(
    engine: Engine,
    levels: list[int],
    args,
    gen: torch.Generator,
    report: dict,
    grammar: str | None = None,
    runs: dict | None = None,
) -> dict:
    """`generate` at each level through the started engine (the first request of each level's shape, and
    so the first compile of its buckets, lands in a warm-up generation); into `runs` (already in the report:
    a run cut short keeps its levels) when given."""
    runs = {} if runs is None else runs
    engine.start()
    try:
        for rows in levels:
            started = time.perf_counter()
            asyncio.run(generate(engine, rows, args.prompt, 4, gen, grammar))  # warm-up (and the compiles)
            with Phases(engine) as phases:
                runs[rows] = asyncio.run(generate(engine, rows, args.prompt, args.tokens, gen, grammar))
            runs[rows]["warm_up_s"] = round(time.perf_counter() - started, 1)
            runs[rows]["host_ms_per_pass"] = phases.report()
            print(f"engine {rows} rows, decoding passes {engine.decode_mode}: {runs[rows]}", flush=True)
            write_json(report, args.out)
    finally:
        engine.shutdown()
    return runs


class Phases:
    """Host time of the engine's step phases (wall clock on its thread, per pass): `_pass` launches the
    forward (on a GPU it returns before the GPU is done), `_sample` reads the sampled ids back (there the
    host waits for the GPU), `_advance` is sampling plus handing tokens to the streams; with passes launched
    ahead, `_land` reads a pass's tokens (waiting for that pass, not the one launched after it) and hands
    them out, inside `_run`; with grammar rows, `_draw_after` lands the pass before and draws this one's
    tokens, masked (inside `_run`, `_land` inside it)."""

    NAMES = ("_schedule", "_run", "_pass", "_advance", "_sample", "_land", "_draw_after", "_retire")

    def __init__(self, engine: Engine):
        self.engine, self.totals, self.counts = engine, dict.fromkeys(self.NAMES, 0.0), dict.fromkeys(self.NAMES, 0)

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(self.engine, name)

            def timed(*args, _name=name, _original=original):
                start = time.perf_counter()
                try:
                    return _original(*args)
                finally:
                    self.totals[_name] += time.perf_counter() - start
                    self.counts[_name] += 1

            setattr(self.engine, name, timed)  # an instance attribute: the class's method stays as it is
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            delattr(self.engine, name)

    def report(self) -> dict:
        passes = max(1, self.counts["_run"])
        return {"passes": passes, **{k: round(1000 * v / passes, 3) for k, v in self.totals.items()}}


def torch_counters() -> dict:
    """torch's own counts (graph breaks, recompiles, CUDA graphs skipped, inputs copied into recorded
    graphs): how the compiled decode really ran."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="phi35", choices=sorted(SHAPES))
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--context", type=int, default=384, help="tokens each row holds in `forward`")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--groups", default="4", help="GPU_GROUP values to time beside all rows at once")
    parser.add_argument("--profile", default="1,64")
    parser.add_argument("--compiled", default="1")
    parser.add_argument("--chunks", default="512,1024,2048,4096")
    parser.add_argument("--riders", type=int, default=63)
    parser.add_argument("--engine-compiled", default="1,16,64")
    parser.add_argument("--graphs", default="1,16,64")
    parser.add_argument("--parts", default="forward,profile,prefill,engine,compiled", help="of " + ",".join(PARTS))
    parser.add_argument("--kv-gb", type=float, default=16.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    levels = ints(args.levels)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}; of {PARTS}")
    report: dict = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "shape": args.shape}
    if device.type == "cuda":
        report["torch"] = torch.__version__
    start = time.perf_counter()
    model = make_model(args.shape, device)
    report["model_s"] = round(time.perf_counter() - start, 1)
    print(f"model ready in {report['model_s']} s", flush=True)
    gen = torch.Generator().manual_seed(0)
    budget = int(args.kv_gb * 1e9)

    engine = None
    if parts & {"forward", "profile", "prefill", "engine"}:
        engine = Engine(model, 4096, kv_budget_bytes=budget, max_seqs=max(levels + [args.riders + 1]))
    if parts & {"forward", "profile"}:
        forward = report["forward"] = {}
        for rows in levels:
            inputs, owned = decode_inputs(engine, rows, args.context, gen)
            if "forward" in parts:
                ms = time_passes(engine._decode_step, inputs, args.passes, device)
                in_place = engine.pool.triton_decode  # the Triton kernel, where its start-up check passed
                row = forward[rows] = {"all_rows_ms": round(ms, 2), "triton_in_place": in_place}
                if rmsnorm.unfuse(engine.model):  # transformers' own RMSNorm (the GPU's is fused)
                    row["unfused_norms_ms"] = round(time_passes(engine._decode_step, inputs, args.passes, device), 2)
                    rmsnorm.fuse(engine.model)
                if rope.unfuse_rotary():  # transformers' own rotation (the GPU's in 4 kernels, not 12)
                    row["unfused_rotation_ms"] = round(time_passes(engine._decode_step, inputs, args.passes, device), 2)
                    rope.fuse_rotary()
                engine.pool.triton_decode = False  # the rows gathered for SDPA: in one call, in calls of N
                if in_place:
                    row["gathered_ms"] = round(time_passes(engine._decode_step, inputs, args.passes, device), 2)
                for group in ints(args.groups) if device.type == "cuda" else []:
                    paged.GPU_GROUP, engine._one_call = group, False  # (bucketed passes: one call on a GPU)
                    try:
                        ms = time_passes(engine._decode_step, inputs, args.passes, device)
                        row[f"groups_of_{group}_ms"] = round(ms, 2)
                    finally:
                        paged.GPU_GROUP, engine._one_call = None, engine.device.type == "cuda"
                engine.pool.triton_decode = in_place
                print(f"forward {rows} rows: {row}", flush=True)
            if "profile" in parts and rows in ints(args.profile):
                report.setdefault("profile", {})[rows] = prof = profile(engine, inputs, device)
                print(f"profile {rows} rows: {prof}", flush=True)
            engine.blocks.release(owned)
            write_json(report, args.out)
    if "prefill" in parts:
        report["prefill"] = prefill = {}
        for chunk in ints(args.chunks):
            prefill[chunk] = {
                f"with_{riders}_decoding_ms": round(prefill_pass(engine, chunk, riders, args, gen, device), 2)
                for riders in (0, args.riders)
            }
            print(f"prefill {chunk} tokens: {prefill[chunk]}", flush=True)
            write_json(report, args.out)
    if "engine" in parts:
        run_engine(engine, levels, args, gen, report, runs=report.setdefault("engine", {}))
    del engine

    if "engine-compiled" in parts:
        rows = ints(args.engine_compiled)
        engine = Engine(model, 4096, kv_budget_bytes=budget, max_seqs=max(rows), compile_decode=True)
        run_engine(engine, rows, args, gen, report, runs=report.setdefault("engine-compiled", {}))
        report["engine-compiled"]["torch_counters"] = torch_counters()
        del engine
    if "compiled" in parts:
        compiled_levels = ints(args.compiled)
        t0 = time.perf_counter()
        engine = Engine(model, 4096, kv_budget_bytes=budget, max_seqs=max(compiled_levels), compile_decode=True)
        # on a GPU the start-up check compiled it (rows and blocks symbolic) and captured its first graph
        runs = report["compiled"] = {"decode_mode": engine.decode_mode, "start_s": round(time.perf_counter() - t0, 1)}
        for rows in compiled_levels:
            rows = max(rows, engine._min_bucket)  # (a GPU's buckets start at 2 rows)
            inputs, owned = decode_inputs(engine, rows, args.context, gen)
            step, step_args = engine._decode, inputs
            if engine._graphs is not None:  # as the engine calls it: from its CUDA graphs
                ids, positions, slots, tables, lens = (t.tolist() for t in inputs)
                step, step_args = engine._graphs, (ids[0], positions[0], slots, lens, tables)
            t0 = time.perf_counter()
            with torch.inference_mode():
                step(*step_args)
                step(*step_args)
            sync(device)
            compile_s = time.perf_counter() - t0
            ms = time_passes(step, step_args, args.passes, device)
            runs[rows] = {"compile_s": round(compile_s, 1), "ms_per_pass": round(ms, 2)}
            print(f"compiled {rows} rows: {runs[rows]}", flush=True)
            engine.blocks.release(owned)
            write_json(report, args.out)
        runs["torch_counters"] = torch_counters()
        del engine
    if "graphs" in parts:
        report["graphs"] = replay_graphs(model, ints(args.graphs), budget, args, gen, report)
    if "tools" in parts:
        report["tools"] = tool_rows(model, ints(args.graphs), budget, args, gen, report)
    emit(report, args.out)


def replay_graphs(model, levels: list[int], budget: int, args, gen: torch.Generator, report: dict) -> dict:
    engine = Engine(model, 4096, kv_budget_bytes=budget, max_seqs=max(levels), decode_graphs=True, async_decode=True)
    runs = report["graphs"] = {"decode_mode": engine.decode_mode}  # (in the report as it fills: a cut run keeps it)
    print(f"graphs: decoding passes {engine.decode_mode}", flush=True)
    if engine._graphs is None:  # the start-up check said why (logged)
        return runs
    for rows in levels:
        inputs, owned = decode_inputs(engine, rows, args.context, gen)
        ids, positions, slots, tables, lens = (t.tolist() for t in inputs)
        args_ = (ids[0], positions[0], slots, lens, tables)
        t0 = time.perf_counter()
        with torch.inference_mode():
            engine._graphs(*args_)  # the capture
        sync(engine.device)
        capture_s = time.perf_counter() - t0
        ms = time_passes(engine._graphs, args_, args.passes, engine.device)
        runs[rows] = {"capture_s": round(capture_s, 2), "ms_per_pass": round(ms, 2)}
        print(f"graphs {rows} rows: {runs[rows]}", flush=True)
        engine.blocks.release(owned)
        write_json(report, args.out)
    # the engine's loop with them: passes launched ahead of reading the last one's tokens (the server's
    # default, server.async_scheduling), then read one by one
    run_engine(engine, levels, args, gen, report, runs=runs.setdefault("engine", {}))
    del engine  # (its pool and graphs, before the next one's)
    gc.collect()
    stepwise = Engine(model, 4096, kv_budget_bytes=budget, max_seqs=max(levels), decode_graphs=True)
    run_engine(stepwise, levels, args, gen, report, runs=runs.setdefault("engine_stepwise", {}))
    return runs


def tool_rows(model, levels: list[int], budget: int, args, gen: torch.Generator, report: dict) -> dict:
    """The engine's loop with every request offered a tool (tool_choice "auto", the grammar the server
    builds for it), passes from CUDA graphs launched ahead, then read one by one."""
    from transformers import AutoTokenizer, GenerationConfig

    from ptserve.engine.grammar import GrammarBackend
    from ptserve.protocol import validate_request
    from ptserve.structured import build_grammar
    from ptserve.tinymodel import PHI35_DIR

    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    request = validate_request({"model": "m", "messages": [{"role": "user", "content": "Oi"}], "tools": [tool]})
    grammar = build_grammar(request)
    eos = GenerationConfig.from_pretrained(PHI35_DIR).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    backend = GrammarBackend(AutoTokenizer.from_pretrained(PHI35_DIR), model.config.vocab_size, eos)
    runs = report["tools"] = {}
    for name, ahead in (("tools", True), ("tools_stepwise", False)):
        kw = dict(kv_budget_bytes=budget, max_seqs=max(levels), grammars=backend, decode_graphs=True)
        engine = Engine(model, 4096, async_decode=ahead, **kw)
        runs[f"{name}_decode_mode"] = engine.decode_mode
        run_engine(engine, levels, args, gen, report, grammar, runs.setdefault(name, {}))
        del engine  # (its pool and graphs, before the next one's)
        gc.collect()
    return runs


if __name__ == "__main__":
    main()
