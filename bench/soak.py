"""Memory soak: does the server's memory plateau under long mixed traffic?

    python bench/soak.py [--requests 3000] [--concurrency 8] [--out FILE]

Starts ptserve on loopback with a tiny random-weight Phi-3.5 (Phi-3.5's tokenizer, hidden 64; built once in
bench/out/) and sends `--requests` requests, `--concurrency` at a time, cycling through a mix: streamed
chat (with usage), plain chat, n=2 with logprobs, JSON-schema output, tool calls, legacy completions with
echo and logprobs, a long prompt, and one in four streams abandoned after three chunks. After a warm-up
and after each third it reads the resident memory (VmRSS) of every process of the server (main, HTTP,
inference worker, manager) and reports each third's growth, with how much of the KV pool has been written
by then (`ptserve_kv_cache_pool_touched_bytes`: the prefix cache keeps what it holds, so the pool's touched
part grows with distinct prompts up to the configured budget). A benchmark, not a test: nothing here
asserts; the README quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import TINY_MODEL, emit, tiny_server  # noqa: E402

WARMUP = 100

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}},
        },
    }
]


def chat(i: int, **fields) -> tuple[str, dict]:
    messages = [{"role": "user", "content": f"Pergunta {i}: como está o tempo em Lisboa hoje?"}]
    return "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 24, **fields}


def mix(i: int) -> tuple[str, dict, bool]:
    """(path, body, abandon mid-stream) for request i."""
    kind = i % 8
    if kind in (0, 4):  # a quarter: streams the client leaves after three chunks
        return (*chat(i, stream=True, max_tokens=200), True)
    if kind == 1:
        return (*chat(i, stream=True, stream_options={"include_usage": True}), False)
    if kind == 2:
        return (*chat(i, n=2, logprobs=True, top_logprobs=3, temperature=1.0, seed=i), False)
    if kind == 3:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        return (*chat(i, response_format=fmt, max_tokens=40), False)
    if kind == 5:
        return (*chat(i, tools=TOOLS, tool_choice="required", max_tokens=40, logit_bias={"32007": 30}), False)
    if kind == 6:
        body = {"model": "m", "prompt": f"Era uma vez {i}", "max_tokens": 8, "echo": True, "logprobs": 2}
        return "/v1/completions", body, False
    long_prompt = " ".join(f"palavra{j}" for j in range(400 + i % 50))
    return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": long_prompt}]}, False


async def one(client: httpx.AsyncClient, i: int) -> str:
    path, body, abandon = mix(i)
    if body.get("stream"):
        async with client.stream("POST", path, json=body) as r:
            chunks = 0
            async for line in r.aiter_lines():
                chunks += bool(line)
                if abandon and chunks >= 3:
                    return "abandoned"
        return str(r.status_code)
    r = await client.post(path, json=body)
    return str(r.status_code)


async def drive(base_url: str, start: int, count: int, concurrency: int) -> dict[str, int]:
    counter = itertools.count(start)
    outcomes: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

        async def worker():
            while (i := next(counter)) < start + count:
                outcome = await one(client, i)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def processes(root_pid: int) -> dict[int, str]:
    """The server's processes (its session: this script starts it with start_new_session), named: LitServe
    forks its manager and then the HTTP server from the main process, and spawns the inference worker."""
    found, forked = {}, []
    for entry in sorted(Path("/proc").iterdir(), key=lambda e: int(e.name) if e.name.isdigit() else -1):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) != root_pid:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if pid == root_pid:
            found[pid] = "main"
        elif "resource_tracker" in cmd:
            found[pid] = "resource tracker"
        elif "spawn_main" in cmd:
            found[pid] = "inference worker"
        else:
            forked.append(pid)
    for pid, role in zip(forked, ("manager", "http"), strict=False):
        found[pid] = role
    return found


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def snapshot(root_pid: int) -> dict[str, float]:
    return {role: round(rss_mb(pid), 1) for pid, role in sorted(processes(root_pid).items())}


def kv_touched_mb(base: str) -> float:
    """The KV pool's bytes written so far (its blocks ever handed out), from /metrics: on the CPU the pool
    is part of the worker's resident memory as far as it has been touched."""
    text = httpx.get(base + "/metrics", timeout=10).text
    found = [
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("ptserve_kv_cache_pool_touched_bytes")
    ]
    return round(sum(found) / 2**20, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", type=Path, default=TINY_MODEL)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tiny_server("soak", args.model) as server:
        base = server.base_url
        asyncio.run(drive(base, 0, WARMUP, args.concurrency))
        rows = [{"after": WARMUP, "rss_mb": snapshot(server.proc.pid), "kv_touched_mb": kv_touched_mb(base)}]
        third = args.requests // 3
        outcomes: dict[str, int] = {}
        for k in range(3):
            began = time.monotonic()
            for key, n in asyncio.run(drive(base, WARMUP + k * third, third, args.concurrency)).items():
                outcomes[key] = outcomes.get(key, 0) + n
            time.sleep(1.0)  # let abandoned sequences finish leaving
            rows.append(
                {
                    "after": WARMUP + (k + 1) * third,
                    "seconds": round(time.monotonic() - began, 1),
                    "rss_mb": snapshot(server.proc.pid),
                    "kv_touched_mb": kv_touched_mb(base),
                }
            )
            total = sum(rows[-1]["rss_mb"].values())
            before = sum(rows[-2]["rss_mb"].values())
            rows[-1]["total_mb"] = round(total, 1)
            rows[-1]["growth_pct"] = round(100 * (total - before) / before, 2)
            print(json.dumps(rows[-1]), flush=True)
        rows[0]["total_mb"] = round(sum(rows[0]["rss_mb"].values()), 1)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "requests": WARMUP + 3 * (args.requests // 3),
        "concurrency": args.concurrency,
        "outcomes": outcomes,
        "rows": rows,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
