"""Tier 3: limits over HTTP: a full queue gets 429 with Retry-After, a request that could never fit the
KV cache gets 400, body size 413, prompt tokens 400, request timeout 504 (and the sequence is freed),
strict model names 404; the server keeps serving."""

import json
import subprocess
import time

import httpx
import pytest

from tests.conftest import RunningServer, served, wait_gauge
from tests.openai_schema import validate

pytestmark = pytest.mark.server

URL = "/v1/chat/completions"


def body(max_tokens, stream=False):
    return {
        "ignore_eos": True,  # the random model may emit an EOS id early; these requests must run long
        "model": "m",  # an alias of the served name on the narrow server, which refuses unknown names
        "messages": [{"role": "user", "content": "Olá"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


@pytest.fixture(scope="module")
def narrow_server(tiny_model_dir, tmp_path_factory):
    """One sequence at a time, one waiting, and a KV pool of 2 MB: 122 blocks of 16 tokens (1024 bytes per token
    in float32), one of them the null block, so 1936 tokens;
    aliases, strict names, a 4 KiB body limit and a 64-token prompt limit."""
    with served(
        tmp_path_factory,
        "narrow",
        f"model:\n  id: {tiny_model_dir}\n  dtype: float32\n  aliases: [m, gpt-4o-mini]\n  strict_names: true\n"
        "server:\n  max_concurrent_sequences: 1\n  max_queued_requests: 1\n  kv_cache_gb: 0.002\n"
        "  max_body_bytes: 4096\n  max_prompt_tokens: 64\n",
    ) as srv:
        yield srv


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
    assert "whole cache holds 1936" in error["message"]
    ok = httpx.post(narrow_server.base_url + URL, json=body(5), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_requests_while_loading_get_503_then_sigterm_shuts_everything_down(tiny_model_dir, tmp_path):
    import os
    import signal

    srv = RunningServer(["--model", str(tiny_model_dir)], log_path=tmp_path / "server.log")
    try:
        statuses = []
        for _ in range(600):  # until the model is loaded; answers come at once either way
            try:
                r = httpx.post(srv.base_url + URL, json=body(2), timeout=60)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.1)
                continue
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            validate(r.json(), "ErrorResponse")
            assert (r.json()["error"]["code"], r.headers["retry-after"]) == ("model_loading", "5")
            time.sleep(0.1)
        assert statuses[0] == 503 and set(statuses[:-1]) == {503} and statuses[-1] == 200
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


def test_strict_names_aliases_and_models_list(narrow_server):
    base = narrow_server.base_url
    listed = httpx.get(base + "/v1/models").json()
    validate(listed, "ListModelsResponse")
    assert [m["id"] for m in listed["data"]] == ["phi-3.5-mini-instruct", "m", "gpt-4o-mini"]
    ok = httpx.post(base + URL, json={**body(2), "model": "gpt-4o-mini"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["model"] == "gpt-4o-mini"  # the name asked for
    refused = httpx.post(base + URL, json={**body(2), "model": "llama-3"}, timeout=60)
    assert refused.status_code == 404
    validate(refused.json(), "ErrorResponse")
    assert refused.json()["error"] == {
        "message": "The model 'llama-3' does not exist. This server serves: phi-3.5-mini-instruct, m, gpt-4o-mini.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    completion = httpx.post(base + "/v1/completions", json={"model": "llama-3", "prompt": "x"}, timeout=60)
    assert completion.status_code == 404


def test_body_size_and_prompt_token_limits(narrow_server):
    base = narrow_server.base_url
    big = httpx.post(base + URL, json={**body(2), "messages": [{"role": "user", "content": "x" * 5000}]}, timeout=60)
    assert big.status_code == 413
    validate(big.json(), "ErrorResponse")
    assert big.json()["error"]["code"] == "request_too_large"
    assert "the limit is 4096 bytes (server.max_body_bytes)" in big.json()["error"]["message"]
    long_prompt = {**body(2), "messages": [{"role": "user", "content": "palavra " * 40}]}
    r = httpx.post(base + URL, json=long_prompt, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("messages", "prompt_too_long")
    assert "this server accepts at most 64 (server.max_prompt_tokens)" in error["message"]
    r = httpx.post(base + "/v1/completions", json={"model": "m", "prompt": "palavra " * 40}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    ok = httpx.post(base + URL, json=body(2), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def hurried_server(tiny_model_dir, tmp_path_factory):
    """Requests may take 0.2 s at most: a 400-token answer (about a second here) never makes it."""
    text = f"model:\n  id: {tiny_model_dir}\nserver:\n  request_timeout_s: 0.2\n"
    with served(tmp_path_factory, "hurried", text) as srv:
        yield srv


def test_request_timeout_cancels_stream_and_not(hurried_server):
    base = hurried_server.base_url
    r = httpx.post(base + URL, json=body(400), timeout=60)
    assert r.status_code == 504
    validate(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "timeout")
    assert "did not finish within 0.2 s (server.request_timeout_s)" in error["message"]
    with httpx.stream("POST", base + URL, json=body(400, stream=True), timeout=60) as s:
        assert s.status_code == 200
        frames = [line.removeprefix("data: ") for line in s.iter_lines() if line]
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    validate(last, "ErrorResponse")
    assert last["error"]["code"] == "timeout"
    assert wait_gauge(hurried_server, "ptserve_running_sequences", 0) == 0  # both sequences left the engine
