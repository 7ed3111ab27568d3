"""What the CPU benchmarks share: a tiny random-weight Phi-3.5 served on loopback, and the report."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
TINY_MODEL = OUT / "soak-model"  # Phi-3.5's tokenizer and config, hidden 64 (ptserve.tinymodel's default)


@contextlib.contextmanager
def tiny_server(name: str, model: Path = TINY_MODEL, context: int = 4096):
    """ptserve on `model` (built first if missing) with a `context`-token window, ready; stopped on exit.
    Its config and log are bench/out/<name>-config.yaml and <name>-server.log."""
    from tests.conftest import RunningServer

    OUT.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").exists():
        from ptserve.tinymodel import build

        build(model)
    config = OUT / f"{name}-config.yaml"
    config.write_text(f"model:\n  id: {model}\n  max_context_length: {context}\n")
    server = RunningServer(["--config", str(config)], log_path=OUT / f"{name}-server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def write_json(report: dict, out: Path | None) -> None:
    """Write the report to `out` when given (folders made as needed)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


def emit(report: dict, out: Path | None) -> None:
    """Print the report, and write it to `out` when given."""
    print(json.dumps(report, indent=2))
    write_json(report, out)


async def sse_lines(response):
    """A streamed response's lines as SSE ends them (LF, CR or CRLF only). httpx's aiter_lines also breaks
    at U+2028, U+0085 and the like, which a peer's JSON may carry raw (vLLM's, on the random model's text)."""
    buffer = ""
    async for text in response.aiter_text():
        *lines, buffer = re.split(r"\r\n|\r|\n", buffer + text)
        for line in lines:
            yield line
    if buffer:
        yield buffer
