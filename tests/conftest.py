"""Fixtures for the three tiers: a tiny random-weight Phi-3 built locally, and the real server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Triton (where installed) runs its kernels in its interpreter on a machine without CUDA: the Triton kernel's
# tests (tests/test_engine.py). Triton reads this when it is imported, so it is set before anything can
# (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
API_KEY = "test-key-123"
SECOND_KEY = "second-key-456"  # the server takes several keys
TEST_CONTEXT = 512  # small, so the context-length errors are cheap to reach


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ptserve.tinymodel import build

    return build(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.health_seen: list[int] = []  # /health statuses while starting
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PTSERVE_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--port", str(self.port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.health_seen.append(httpx.get(f"{self.base_url}/health", timeout=2).status_code)
                if self.health_seen[-1] == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@contextlib.contextmanager
def served(tmp_path_factory, name: str, config_text: str | None, args: tuple[str, ...] = ()):
    """A server started from `config_text` (None: from `args` alone), its log beside it, ready; stopped on exit."""
    tmp = tmp_path_factory.mktemp(name)
    if config_text is not None:
        config = tmp / "config.yaml"
        config.write_text(config_text)
        args = ("--config", str(config), *args)
    srv = RunningServer(list(args), log_path=tmp / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory) -> RunningServer:
    """The real server on loopback: tiny model in float32, two API keys, a 512-token context. float32: tests
    compare outputs exactly (a prompt read from the prefix cache must answer as when computed), and in
    bf16 (`auto` on a CPU with AMX) the two attention paths' roundings can flip a near-tie greedy token."""
    text = (
        f"model:\n  id: {tiny_model_dir}\n  dtype: float32\n  max_context_length: {TEST_CONTEXT}\n"
        "server:\n  cors_origins: ['http://example.test']\n"
    )
    with served(tmp_path_factory, "server", text, ("--api-key", API_KEY, "--api-key", SECOND_KEY)) as srv:
        yield srv


def metric(server, line_start: str) -> float:
    """The sum of the /metrics samples whose line starts with `line_start` (a name, or a name and labels)."""
    text = httpx.get(server.base_url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def gauge(server, name: str) -> float:
    """A worker gauge from /metrics, summed over the workers."""
    return metric(server, name + "{")


def wait_gauge(server, name: str, want: float, limit_s: float = 30) -> float:
    """Poll until the gauge reads `want` (workers publish every 50 ms); the last reading."""
    deadline = time.monotonic() + limit_s
    while (now := gauge(server, name)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def session_processes(sid: int) -> dict[int, str]:
    """The processes of session `sid` (a test server's: RunningServer starts it in a session of its own),
    each with its command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ProcessLookupError):
                pass
    return found
