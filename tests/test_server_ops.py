"""Tier 3: running it like a product: two engine replicas (workers_per_device: 2), cancellations that
reach whichever worker holds the request, Prometheus metrics, request ids, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest

from tests.conftest import gauge, metric, served, wait_gauge

pytestmark = pytest.mark.server

URL = "/v1/chat/completions"
USER = [{"role": "user", "content": "Olá"}]


@pytest.fixture(scope="module")
def ops_server(tiny_model_dir, tmp_path_factory):
    text = (
        f"model:\n  id: {tiny_model_dir}\n  max_context_length: 2048\n"
        "server:\n  workers_per_device: 2\n  shutdown_timeout_s: 60\n"
    )
    with served(tmp_path_factory, "ops", text) as srv:
        yield srv


def body(max_tokens, stream=False):
    return {
        "model": "m",
        "messages": USER,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def test_two_workers_publish_their_gauges(ops_server):
    text = httpx.get(ops_server.base_url + "/metrics").text
    up = [x for x in text.splitlines() if x.startswith("ptserve_worker_up{")]
    assert len(up) == 2 and all(x.endswith(" 1.0") for x in up)
    assert gauge(ops_server, "ptserve_max_running_sequences") == 128  # 64 per replica


def counters(server) -> dict[str, float]:
    return {
        "requests": metric(server, 'ptserve_requests_total{endpoint="/v1/chat/completions",status="200"}'),
        "bad": metric(server, 'ptserve_requests_total{endpoint="/v1/chat/completions",status="400"}'),
        "generated": metric(server, "ptserve_generation_tokens_total"),
        "prompt": metric(server, "ptserve_prompt_tokens_total"),
        "ttft": metric(server, "ptserve_time_to_first_token_seconds_count"),
        "itl": metric(server, "ptserve_inter_token_latency_seconds_count"),
        "duration": metric(server, 'ptserve_request_duration_seconds_count{endpoint="/v1/chat/completions"}'),
    }


def test_metrics_count_requests_tokens_and_latencies(ops_server):
    before = counters(ops_server)
    usage = httpx.post(ops_server.base_url + URL, json=body(9), timeout=60).json()["usage"]
    with httpx.stream("POST", ops_server.base_url + URL, json=body(5, stream=True), timeout=60) as r:
        assert r.read().decode().endswith("data: [DONE]\n\n")
    assert httpx.post(ops_server.base_url + URL, json={"model": "m"}, timeout=60).status_code == 400
    after = counters(ops_server)
    delta = {k: after[k] - before[k] for k in before}
    assert delta == {
        "requests": 2,
        "bad": 1,
        "generated": 9 + 5,
        "prompt": 2 * usage["prompt_tokens"],
        "ttft": 2,
        "itl": 8 + 4,  # every token after the first
        "duration": 3,
    }


def test_request_ids_in_headers_and_log_lines(ops_server):
    given = httpx.post(
        ops_server.base_url + URL, json={"model": "m"}, headers={"x-request-id": "test-rid-42"}, timeout=60
    )
    assert given.headers["x-request-id"] == "test-rid-42"
    made = httpx.get(ops_server.base_url + "/health")
    assert made.headers["x-request-id"].startswith("req-") and len(made.headers["x-request-id"]) == 28
    odd = httpx.get(ops_server.base_url + "/health", headers={"x-request-id": "x" * 300})
    assert odd.headers["x-request-id"].startswith("req-")
    log = ops_server.log_path.read_text()
    assert "[test-rid-42]: refused with 400: Missing required parameter: 'messages'." in log


def test_cancellations_reach_whichever_worker_holds_the_request(ops_server):
    assert wait_gauge(ops_server, "ptserve_running_sequences", 0) == 0
    clients = [httpx.Client(base_url=ops_server.base_url, timeout=60) for _ in range(4)]
    streams = [c.stream("POST", URL, json=body(1800, stream=True)) for c in clients]
    responses = [s.__enter__() for s in streams]
    lines = [r.iter_lines() for r in responses]
    for it in lines:
        next(it)  # every request is running
    assert wait_gauge(ops_server, "ptserve_running_sequences", 4) == 4
    text = httpx.get(ops_server.base_url + "/metrics").text
    per_worker = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("ptserve_running_sequences{")]
    assert len(per_worker) == 2 and sum(per_worker) == 4  # which worker runs which is LitServe's choice
    for s, c in zip(streams, clients, strict=True):
        s.__exit__(None, None, None)
        c.close()
    assert wait_gauge(ops_server, "ptserve_running_sequences", 0) == 0


def test_sigterm_lets_a_running_stream_finish_then_exits_0(ops_server):
    """Kubernetes and docker stop send SIGTERM to PID 1 only: in-flight streams finish (up to
    server.shutdown_timeout_s), new connections are refused, the server exits 0. Runs last."""
    frames: list[str] = []

    def read():
        with httpx.stream("POST", ops_server.base_url + URL, json=body(600, stream=True), timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    frames.append(line.removeprefix("data: "))

    reader = threading.Thread(target=read)
    reader.start()
    assert wait_gauge(ops_server, "ptserve_running_sequences", 1) == 1
    os.kill(ops_server.proc.pid, signal.SIGTERM)
    reader.join(timeout=120)
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert sum(1 for f in frames[:-1] if json.loads(f)["choices"][0]["delta"].get("content") is not None) >= 2
    assert ops_server.proc.wait(timeout=120) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(ops_server.base_url + "/health", timeout=5)
    assert "leaked semaphore" not in ops_server.log_path.read_text()  # (tqdm's lock in the workers)
