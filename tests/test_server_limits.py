"""Tier 3: batching limits over HTTP: a full queue gets 429 with Retry-After, a request that could never
fit the KV cache gets 400, a client that disconnects frees its slot; the server keeps serving."""

import subprocess
import time

import httpx
import pytest

from tests.conftest import RunningServer
from tests.openai_schema import validate

pytestmark = pytest.mark.server

URL = "/v1/chat/completions"


def body(max_tokens, stream=False):
    return {
        "ignore_eos": True,  # the random model may emit an EOS id early; these requests must run long
        "model": "m",
        "messages": [{"role": "user", "content": "Olá"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


@pytest.fixture(scope="module")
def narrow_server(tiny_model_dir, tmp_path_factory):
    """One sequence at a time, one waiting, and a KV cache of 1953 tokens (1024 bytes per token in float32)."""
    tmp = tmp_path_factory.mktemp("narrow")
    config = tmp / "config.yaml"
    config.write_text(
        f"model:\n  id: {tiny_model_dir}\n  dtype: float32\n"
        "server:\n  max_concurrent_sequences: 1\n  max_queued_requests: 1\n  kv_cache_gb: 0.002\n"
    )
    srv = RunningServer(["--config", str(config)], log_path=tmp / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_full_queue_gets_429_with_retry_after(narrow_server):
    base = narrow_server.base_url
    with httpx.Client(base_url=base, timeout=60) as client:
        with client.stream("POST", URL, json=body(1800, stream=True)) as running:
            lines = running.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(lines)  # the first sequence holds the only slot
            with client.stream("POST", URL, json=body(3, stream=True)) as waiting:
                assert waiting.status_code == 200  # accepted: it waits in the queue
                refused = client.post(URL, json=body(3))
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                validate(refused.json(), "ErrorResponse")
                assert refused.json()["error"]["type"] == "rate_limit_error"
                assert refused.json()["error"]["code"] == "queue_full"
            # closing both streams cancels them (asynchronously): a client that honours Retry-After gets in
        for _ in range(5):
            answer = client.post(URL, json=body(3))
            if answer.status_code != 429:
                break
            time.sleep(float(answer.headers["retry-after"]))
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_request_that_never_fits_the_kv_cache_gets_400(narrow_server):
    r = httpx.post(narrow_server.base_url + URL, json=body(1950), timeout=60)
    assert r.status_code == 400
    validate(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("max_tokens", "kv_cache_exceeded")
    assert "whole cache holds 1953" in error["message"]
    ok = httpx.post(narrow_server.base_url + URL, json=body(5), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_sigterm_to_the_main_process_shuts_everything_down(tiny_model_dir, tmp_path):
    import os
    import signal

    srv = RunningServer(["--model", str(tiny_model_dir)], log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        os.kill(srv.proc.pid, signal.SIGTERM)  # what docker stop and Kubernetes send, to PID 1 only
        assert srv.proc.wait(timeout=60) == 0
        for _ in range(20):  # the API server and inference worker processes go too
            leftovers = subprocess.run(["pgrep", "-s", str(srv.proc.pid)], capture_output=True, text=True).stdout
            if not leftovers:
                break
            time.sleep(0.5)
        assert leftovers == ""
        assert "KeyboardInterrupt received. Initiating graceful shutdown." in srv.log_path.read_text()
    finally:
        srv.stop()
