"""Fault paths: the engine and the worker in-process with faults injected (out of memory mid-batch, a
poisoned device, the engine thread dying, one of n choices failing), then the real server over loopback
with the same faults (tests/faults/sitecustomize.py) and clients that leave before the first byte.

Nothing is lost or left running: every request gets an answer or an error at once, failed sequences
free their slots, and an engine that cannot go on makes /health 503 and the server exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch
from starlette.requests import ClientDisconnect

from ptserve.config import load_config
from ptserve.engine import loader
from ptserve.engine.detokenize import TokenNames
from ptserve.engine.sampling import SamplingParams
from ptserve.engine.scheduler import Engine, EngineDead, StepOutput
from ptserve.exchange import Deadline, Exchange, ReleasingStreamingResponse
from ptserve.frontend import Prepared
from ptserve.job import Job
from ptserve.protocol import ChatCompletionRequest, ChatMessage
from ptserve.streaming import ChatFormat
from ptserve.worker import Worker
from tests.conftest import RunningServer, gauge, session_processes, wait_gauge

FAULTS = Path(__file__).resolve().parent / "faults"
USER = [{"role": "user", "content": "Olá!"}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    overrides = {("model", "id"): str(tiny_model_dir), ("model", "dtype"): "float32"}
    return loader.load(load_config(None, environ={}, overrides=overrides))


def inject(engine: Engine, error: BaseException, at: int, phase: str = "decode") -> None:
    """The engine's `at`-th forward pass of `phase` raises: "decode" (every row decoding, one token each)
    or "prefill" (a pass with rows joining)."""
    real = engine._forward
    calls = itertools.count(1)

    def forward(batch, input_ids, position_ids, prefill):
        if prefill == (phase == "prefill") and next(calls) == at:
            raise error
        return real(batch, input_ids, position_ids, prefill)

    engine._forward = forward


def run_one(engine: Engine, ids: list[int], params: SamplingParams) -> tuple[list[int], str | None]:
    async def one():
        return await collect(engine.submit(ids, params))

    return asyncio.run(one())


async def collect(stream) -> tuple[list[int], str | None]:
    tokens, finish = [], None
    async for out in stream:
        tokens += out.token_ids
        finish = out.finish_reason
    return tokens, finish


def greedy(n: int) -> SamplingParams:
    return SamplingParams(n, temperature=0.0)


# -- engine, in-process -------------------------------------------------------------------------------
def test_out_of_memory_mid_batch_fails_that_batch_and_the_engine_serves_on(loaded, tokenizer):
    ids = tokenizer("Olá, tudo bem?", add_special_tokens=False)["input_ids"]
    engine = Engine(loaded.model, loaded.max_context_length).start()
    try:
        reference = run_one(engine, ids, greedy(8))
        inject(engine, torch.OutOfMemoryError("CUDA out of memory (injected)"), at=3)

        async def scenario():
            batch = engine.submit_many([(ids, greedy(8))] * 3)
            failed = await asyncio.gather(*(collect(s) for s in batch))
            after = await collect(engine.submit(ids, greedy(8)))
            return batch, failed, after

        batch, failed, after = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert [finish for _, finish in failed] == ["error"] * 3
    assert all("OutOfMemoryError" in s.error for s in batch)
    assert [len(tokens) for tokens, _ in failed] == [3] * 3  # the prefill's token, two decode steps, then OOM
    assert after == reference and engine.dead is None and engine.running == 0


def test_out_of_memory_in_a_joining_prefill_spares_the_running_rows(loaded, tokenizer):
    ids = tokenizer("Olá, tudo bem?", add_special_tokens=False)["input_ids"]
    engine = Engine(loaded.model, loaded.max_context_length).start()
    try:
        reference = run_one(engine, ids, greedy(30))

        async def scenario():
            running = engine.submit(ids, greedy(30))
            it = aiter(running)
            tokens, finish = list((await anext(it)).token_ids), None  # running: its prefill is done
            inject(engine, torch.OutOfMemoryError("CUDA out of memory (injected)"), at=1, phase="prefill")
            joining = engine.submit(ids, greedy(5))
            async for out in it:
                tokens += out.token_ids
                finish = out.finish_reason
            return (tokens, finish), await collect(joining), joining

        kept, lost, joining = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert kept == reference
    assert lost == ([], "error") and "OutOfMemoryError" in joining.error


@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA error: an illegal memory access was encountered"), KeyboardInterrupt("thread killed")],
    ids=["poisoned-device", "thread-death"],
)
def test_an_engine_that_cannot_go_on_fails_everything_at_once(loaded, tokenizer, error):
    ids = tokenizer("Olá, tudo bem?", add_special_tokens=False)["input_ids"]
    engine = Engine(loaded.model, loaded.max_context_length, max_seqs=2).start()
    inject(engine, error, at=3)
    try:

        async def scenario():
            streams = engine.submit_many([(ids, greedy(50))] * 3)  # two run, one waits for a slot
            return streams, await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 30)

        streams, outs = asyncio.run(scenario())
        assert [finish for _, finish in outs] == ["error"] * 3
        assert engine.dead is not None and all(s.error == engine.dead for s in streams)
        engine._thread.join(timeout=10)
        assert not engine._thread.is_alive()

        async def after():
            return engine.submit(ids, greedy(5))

        with pytest.raises(EngineDead):
            asyncio.run(after())
    finally:
        engine.shutdown()


# -- worker, in-process with a fake engine --------------------------------------------------------------
class FakeStream:
    """A choice that yields a token every 10 ms until cancelled, or fails after `fail_after` tokens."""

    def __init__(self, params: SamplingParams, fail_after: int | None):
        self.params, self.fail_after = params, fail_after
        self.prompt_ids, self.prompt_logprobs = [1], None
        self.cancelled = False
        self.error: str | None = None

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        produced = 0
        while not self.cancelled:
            await asyncio.sleep(0.01)
            if self.fail_after is not None and produced == self.fail_after:
                self.error = "OutOfMemoryError: injected"
                yield StepOutput([], "error")
                return
            produced += 1
            yield StepOutput([450], None)  # "▁The"
        yield StepOutput([], "abort")


class FakeEngine:
    def __init__(self):
        self.streams: list[FakeStream] = []

    def submit_many(self, jobs):
        self.streams = [FakeStream(params, 2 if i == 1 else None) for i, (_, params) in enumerate(jobs)]
        return self.streams


def test_when_one_of_n_choices_fails_its_siblings_are_cancelled(tokenizer):
    worker = Worker.__new__(Worker)
    worker.engine, worker.tokenizer, worker.names = FakeEngine(), tokenizer, TokenNames(tokenizer)
    worker.eos_token_ids, worker.streams, worker.cancelled, worker.shared = (32007,), {}, set(), None
    job = Job(prompts=[[1, 2]], params=SamplingParams(10_000), stop=[], n=3)

    async def scenario():
        messages = []
        async for message in worker.run("uid-1", job):
            messages.append(message)
        return messages

    messages = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert messages[0] == {"accepted": True}
    assert messages[-1] == {"failure": "generation_failed", "detail": "OutOfMemoryError: injected"}
    assert [s.cancelled for s in worker.engine.streams] == [True, True, True]
    assert worker.streams == {}


# -- the HTTP side, in-process: a response whose client is gone before its first byte --------------------
def exchange_with(released: list[bool]) -> Exchange:
    async def messages():  # the worker's messages: a choice that would run for a long time
        while True:
            await asyncio.sleep(0.01)
            yield {"index": 0, "text": "x", "completion_tokens": 1, "finish_reason": None}

    request = ChatCompletionRequest(model="m", messages=[ChatMessage(role="user", content="Olá")], stream=True)
    prepared = Prepared(request, Job([[1]], SamplingParams(10), []), "m")
    return Exchange(messages(), ChatFormat("m"), prepared, Deadline.after(None), released.append)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_stream_is_released_when_its_client_leaves_before_the_first_byte(spec_version):
    """ASGI 2.3 servers (uvicorn) report the disconnect through receive(); 2.4 ones make send() raise, and
    Starlette then never starts the body's generator: its `finally` alone would never release."""
    released: list[bool] = []
    response = ReleasingStreamingResponse(exchange_with(released), media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("connection reset by peer")

    async def scenario():
        with contextlib.suppress(OSError, ClientDisconnect):
            await response(scope, receive, send)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert released == [False]  # cancelled upstream, once


# -- the real server over loopback --------------------------------------------------------------------
def start(tiny_model_dir, tmp_path, fault: str | None, context: int = 4096) -> RunningServer:
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  id: {tiny_model_dir}\n  max_context_length: {context}\n")
    env = {"PYTHONPATH": str(FAULTS)}
    if fault:
        env["FAULT_INJECT"] = fault
    srv = RunningServer(["--config", str(config)], env=env, log_path=tmp_path / "server.log")
    srv.wait_ready()
    return srv


def sse_events(server, **fields) -> list[dict]:
    body = {"model": "m", "messages": USER, "temperature": 0, "stream": True, **fields}
    events = []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


@pytest.mark.server
def test_server_out_of_memory_fails_the_batch_and_serves_on(tiny_model_dir, tmp_path):
    srv = start(tiny_model_dir, tmp_path, "oom:5")
    try:
        events = sse_events(srv, max_tokens=50)
        assert "error" in events[-1] and "OutOfMemoryError" in events[-1]["error"]["message"]
        assert wait_gauge(srv, "ptserve_running_sequences", 0) == 0
        r = httpx.get(srv.base_url + "/health")
        assert (r.status_code, r.text) == (200, "ok")
        body = httpx.post(
            srv.base_url + "/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 5}, timeout=60
        ).json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    finally:
        srv.stop()


@pytest.mark.server
@pytest.mark.parametrize("fault", ["fatal:5", "thread:5"], ids=["poisoned-device", "thread-death"])
def test_server_with_a_dead_engine_says_so_and_exits_non_zero(tiny_model_dir, tmp_path, fault):
    srv = start(tiny_model_dir, tmp_path, fault)
    try:
        began = time.monotonic()
        events = sse_events(srv, max_tokens=2000)  # would run for many seconds
        assert "error" in events[-1] and time.monotonic() - began < 10  # at once, not at request_timeout_s
        statuses = []
        while srv.proc.poll() is None and time.monotonic() - began < 60:
            try:
                r = httpx.get(srv.base_url + "/health", timeout=2)
                statuses.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["status"] == "failed" and "injected" in r.json()["error"]
                    refused = httpx.post(
                        srv.base_url + "/v1/chat/completions", json={"model": "m", "messages": USER}, timeout=10
                    )
                    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert 503 in statuses
        assert srv.proc.wait(timeout=60) != 0
    finally:
        srv.stop()


@pytest.mark.server
def test_a_client_that_leaves_before_the_first_byte_frees_its_sequence(tiny_model_dir, tmp_path):
    srv = start(tiny_model_dir, tmp_path, None, context=16384)
    try:
        body = json.dumps({"model": "m", "messages": USER, "stream": True, "max_tokens": 16000}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                sock.sendall(head + body)
            # closed before reading a byte; 16,000 tokens would take minutes
        assert wait_gauge(srv, "ptserve_running_sequences", 0, limit_s=15) == 0
        assert gauge(srv, "ptserve_queued_sequences") == 0
    finally:
        srv.stop()


@pytest.mark.server
def test_a_killed_main_process_takes_its_workers_and_http_server_with_it(tiny_model_dir, tmp_path):
    """kill -9 of the main process (the out-of-memory killer's way): the inference worker (which holds the
    model and, on a GPU, its memory) and the HTTP process exit too, instead of living on as orphans."""
    srv = start(tiny_model_dir, tmp_path, None)
    sid = srv.proc.pid
    try:
        workers = [p for p, cmd in session_processes(sid).items() if "spawn_main" in cmd]
        assert workers
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = [p for p in workers if p in session_processes(sid)]
            try:
                httpx.get(srv.base_url + "/health", timeout=1)
                serving = True
            except httpx.HTTPError:
                serving = False
            if not left and not serving:
                break
            time.sleep(0.2)
        assert (left, serving) == ([], False)
    finally:
        for pid in session_processes(sid):  # whatever is left (LitServe's manager process)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        srv.stop()
