"""Event-loop stalls: the inter-token latency of running streams while long prompts arrive.

    python bench/loop_stall.py [--model DIR] [--chars 100000] [--long 5] [--out FILE]

Starts ptserve on loopback (a tiny random-weight Phi-3.5 with Phi-3.5's tokenizer, context 4096), opens 8
streaming chat requests, and measures the gaps between their chunks: first for a quiet window, then
while `--long` requests with a `--chars`-character prompt arrive one after another. Those are refused
(400: longer than the context) only after the HTTP process has applied the chat template and tokenized
them, so what they cost the running streams is that work alone, not the engine's prefill. Reports the
p50 / p99 / max gap of each window. A benchmark, not a test: nothing here asserts time.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import TINY_MODEL, emit, tiny_server  # noqa: E402

STREAMS = 8


async def stream(client: httpx.AsyncClient, stamps: list[float], stop: asyncio.Event) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Olá"}], "stream": True}
    while not stop.is_set():
        payload = {**body, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.monotonic())
                if stop.is_set():
                    break


def gaps(stamps_per_stream: list[list[float]], start: float, end: float) -> dict[str, float]:
    found = []
    for stamps in stamps_per_stream:
        inside = [t for t in stamps if start <= t <= end]
        found += [(b - a) * 1000 for a, b in zip(inside, inside[1:], strict=False)]
    found.sort()
    return {
        "gaps": len(found),
        "p50_ms": round(statistics.median(found), 2),
        "p99_ms": round(found[int(0.99 * (len(found) - 1))], 2),
        "max_ms": round(found[-1], 2),
    }


async def run(base_url: str, chars: int, count: int) -> dict:
    stamps: list[list[float]] = [[] for _ in range(STREAMS)]
    stop = asyncio.Event()
    long_text = ("Olá, mundo! " * (chars // 12 + 1))[:chars]
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        tasks = [asyncio.ensure_future(stream(client, s, stop)) for s in stamps]
        await asyncio.sleep(3.0)  # all streams running
        quiet_start = time.monotonic()
        await asyncio.sleep(3.0)
        quiet_end = busy_start = time.monotonic()
        statuses, took = [], []
        for _ in range(count):
            began = time.monotonic()
            r = await client.post(
                "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": long_text}]}
            )
            took.append(round((time.monotonic() - began) * 1000, 1))
            statuses.append(r.status_code)
        busy_end = time.monotonic()
        stop.set()
        await asyncio.gather(*tasks)
    return {
        "quiet": gaps(stamps, quiet_start, quiet_end),
        "while_long_prompts_arrive": gaps(stamps, busy_start, busy_end),
        "long_prompt_statuses": statuses,
        "long_prompt_ms": took,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TINY_MODEL)
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--long", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tiny_server("stall", args.model) as server:
        result = asyncio.run(run(server.base_url, args.chars, args.long))
    report = {
        "machine": f"{platform.processor() or platform.machine()}",
        "streams": STREAMS,
        "chars": args.chars,
        **result,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
