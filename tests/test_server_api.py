"""Tier 3: every sampling parameter, n, logprobs, /v1/completions, model names, auth with several keys
and disconnects, over HTTP against the real server (tiny model), stream and not.

Each test asserts the parameter's effect; every body is validated against the official OpenAI schema.
"""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from tests.conftest import API_KEY, SECOND_KEY, TEST_CONTEXT, served, wait_gauge
from tests.openai_schema import validate

pytestmark = pytest.mark.server

MODEL = "phi-3.5-mini-instruct"
USER = [{"role": "user", "content": "Conte uma história."}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, body, path="/v1/chat/completions", headers=AUTH) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The shared test server's settings in float32: the random model's top logits lie within ~0.01 of each
    other, and in bf16 (what `auto` picks on CPUs with native bf16) two of them tie now and then, which
    makes top_k=1 or min_p=1 keep two tokens where greedy takes the first."""
    text = (
        f"model:\n  id: {tiny_model_dir}\n  max_context_length: {TEST_CONTEXT}\n  dtype: float32\n"
        "server:\n  cors_origins: ['http://example.test']\n"
    )
    with served(tmp_path_factory, "server-f32", text, ("--api-key", API_KEY, "--api-key", SECOND_KEY)) as srv:
        yield srv


def chat(server, **fields) -> dict:
    r = post(server, {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 12, **fields})
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateChatCompletionResponse")
    return r.json()


def stream_chunks(server, body, path="/v1/chat/completions", schema="CreateChatCompletionStreamResponse"):
    chunks = []
    with httpx.stream("POST", server.base_url + path, json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                chunks.append(None)
                continue
            chunk = json.loads(payload)
            if schema:
                validate(chunk, schema)
            chunks.append(chunk)
    assert chunks[-1] is None  # the stream ends with [DONE]
    return chunks[:-1]


def streamed_choices(chunks) -> dict[int, dict]:
    """index -> {"text", "finish_reason", "logprobs"} accumulated from chat chunks."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            acc = out.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": []})
            acc["text"] += c["delta"].get("content") or ""
            if c["finish_reason"]:
                assert acc["finish_reason"] is None  # one finish per choice
                acc["finish_reason"] = c["finish_reason"]
            if c.get("logprobs"):
                acc["logprobs"] += c["logprobs"]["content"]
    return out


def texts(body) -> list[str]:
    return [c["message"]["content"] for c in body["choices"]]


def token_id(tokenizer, record) -> int:
    """The vocabulary id behind a logprobs record (SentencePiece pieces, or a byte token)."""
    found = tokenizer.convert_tokens_to_ids(record["token"].replace(" ", "▁"))
    if found != tokenizer.unk_token_id:
        return found
    assert len(record["bytes"]) == 1
    return tokenizer.convert_tokens_to_ids(f"<0x{record['bytes'][0]:02X}>")


# -- sampling parameters ------------------------------------------------------------------------------
def test_seed_repeats_per_request_stream_and_not(server):
    fields = {"temperature": 1.0, "seed": 1234, "max_tokens": 16}
    a, b = chat(server, **fields), chat(server, **fields)
    other = chat(server, **{**fields, "seed": 99})
    assert texts(a) == texts(b) and texts(a) != texts(other)
    chunks = stream_chunks(server, {"model": MODEL, "messages": USER, "stream": True, **fields})
    assert streamed_choices(chunks)[0]["text"] == texts(a)[0]


def test_top_k_1_is_greedy_and_min_p_1_too(server):
    greedy = texts(chat(server, max_tokens=16))
    assert texts(chat(server, temperature=1.8, top_k=1, max_tokens=16)) == greedy
    assert texts(chat(server, temperature=1.8, min_p=1.0, max_tokens=16)) == greedy


def test_logit_bias_bans_and_forces(server, tokenizer):
    greedy = chat(server, logprobs=True)
    first = greedy["choices"][0]["logprobs"]["content"][0]
    banned = token_id(tokenizer, first)
    body = chat(server, logprobs=True, logit_bias={str(banned): -100})
    assert all(token_id(tokenizer, r) != banned for r in body["choices"][0]["logprobs"]["content"])
    assert texts(body) != texts(greedy)
    a = tokenizer.convert_tokens_to_ids("a")
    forced = chat(server, temperature=1.0, max_tokens=6, logit_bias={str(a): 100})
    assert texts(forced) == ["aaaaaa"]
    assert forced["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize(("field", "value"), [("frequency_penalty", -2.0), ("presence_penalty", -2.0)])
def test_penalties_reach_the_sampler(server, tokenizer, field, value):
    """The random model's top logits lie within ~0.01 of each other and its greedy answer repeats no token;
    a penalty of -2 (OpenAI's lowest) makes the first token win every later step too."""
    plain = chat(server, max_tokens=20, ignore_eos=True, logprobs=True)
    first = plain["choices"][0]["logprobs"]["content"][0]["token"]
    assert len({r["token"] for r in plain["choices"][0]["logprobs"]["content"]}) > 1
    boosted = chat(server, max_tokens=20, ignore_eos=True, logprobs=True, **{field: value})
    assert [r["token"] for r in boosted["choices"][0]["logprobs"]["content"]] == [first] * 20


def test_repetition_penalty_reaches_the_sampler(server):
    plain = texts(chat(server, max_tokens=20, ignore_eos=True))
    assert texts(chat(server, max_tokens=20, ignore_eos=True, repetition_penalty=0.5)) != plain


def test_min_tokens_and_ignore_eos(server, tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    eos_now = {str(end): 100}
    assert chat(server, logit_bias=eos_now)["usage"]["completion_tokens"] == 1
    body = chat(server, logit_bias=eos_now, min_tokens=4)
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (5, "stop")
    body = chat(server, logit_bias=eos_now, ignore_eos=True, max_tokens=7)
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (7, "length")


# -- n ---------------------------------------------------------------------------------------------------
def test_n_choices_have_distinct_indexes_stream_and_not(server):
    fields = {"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 10, "ignore_eos": True}
    body = chat(server, **fields)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len(set(texts(body))) == 3  # seed + index: the choices differ
    assert body["usage"]["completion_tokens"] == 30
    chunks = stream_chunks(
        server,
        {"model": MODEL, "messages": USER, "stream": True, "stream_options": {"include_usage": True}, **fields},
    )
    got = streamed_choices(chunks)
    assert sorted(got) == [0, 1, 2]
    assert [got[i]["text"] for i in range(3)] == texts(body)  # same seed, same choices
    assert all(got[i]["finish_reason"] == "length" for i in range(3))
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 30


def test_n_greedy_gives_identical_choices(server):
    body = chat(server, n=2)
    assert texts(body)[0] == texts(body)[1]


# -- logprobs ------------------------------------------------------------------------------------------
def joined(records, tokenizer) -> str:
    special = set(tokenizer.all_special_tokens)
    return b"".join(bytes(r["bytes"]) for r in records if r["token"] not in special).decode(errors="replace")


def test_logprobs_one_entry_per_token_matching_the_text(server, tokenizer):
    body = chat(server, logprobs=True, top_logprobs=3, max_tokens=15, ignore_eos=True)
    records = body["choices"][0]["logprobs"]["content"]
    assert len(records) == body["usage"]["completion_tokens"] == 15
    text = texts(body)[0]
    assert joined(records, tokenizer).removeprefix(" ") == text.removeprefix(" ")  # SentencePiece's first space
    for r in records:
        assert len(r["top_logprobs"]) == 3
        # greedy: the chosen token is a most likely one (random weights in bf16 do tie)
        assert r["top_logprobs"][0]["logprob"] == pytest.approx(r["logprob"])
        assert r["token"] in [t["token"] for t in r["top_logprobs"] if t["logprob"] == r["logprob"]]
        assert r["logprob"] <= 0 and r["top_logprobs"][0]["logprob"] >= r["top_logprobs"][2]["logprob"]
    chunks = stream_chunks(
        server,
        {
            "model": MODEL,
            "messages": USER,
            "stream": True,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "max_tokens": 15,
            "ignore_eos": True,
        },
    )
    assert streamed_choices(chunks)[0]["logprobs"] == records


def test_no_logprobs_unless_asked(server):
    assert chat(server)["choices"][0]["logprobs"] is None
    assert chat(server, logprobs=True)["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


# -- /v1/completions -----------------------------------------------------------------------------------
def complete(server, **fields) -> dict:
    r = post(server, {"model": MODEL, "temperature": 0, **fields}, path="/v1/completions")
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_text_usage_and_schema(server, tokenizer):
    body = complete(server, prompt="Era uma vez", max_tokens=5, ignore_eos=True)
    validate(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {
        "prompt_tokens": len(tokenizer("Era uma vez")["input_ids"]),
        "completion_tokens": 5,
        "total_tokens": len(tokenizer("Era uma vez")["input_ids"]) + 5,
        "prompt_tokens_details": {"cached_tokens": 0},  # not one full block of 16 tokens
    }
    assert body["choices"][0]["finish_reason"] == "length"
    default = complete(server, prompt="Era uma vez", ignore_eos=True)
    assert default["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens for completions


def test_completion_prompts_list_and_token_ids(server, tokenizer):
    ids = tokenizer("Era uma vez")["input_ids"]
    by_text = complete(server, prompt="Era uma vez", max_tokens=4)
    by_ids = complete(server, prompt=ids, max_tokens=4)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    many = complete(server, prompt=["Era uma vez", "Olá"], n=2, max_tokens=4)
    validate(many, "CreateCompletionResponse")
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == many["choices"][1]["text"] == by_text["choices"][0]["text"]
    assert many["usage"]["prompt_tokens"] == len(ids) + len(tokenizer("Olá")["input_ids"])
    nested = complete(server, prompt=[ids, tokenizer("Olá")["input_ids"]], max_tokens=4)
    assert [c["text"] for c in nested["choices"]] == [many["choices"][0]["text"], many["choices"][2]["text"]]


def test_completion_echo_and_prompt_logprobs(server, tokenizer):
    prompt = "Era uma vez um gato"
    body = complete(server, prompt=prompt, max_tokens=3, echo=True, ignore_eos=True)
    plain = complete(server, prompt=prompt, max_tokens=3, ignore_eos=True)
    assert body["choices"][0]["text"] == prompt + plain["choices"][0]["text"]
    scored = complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = scored["choices"][0]["logprobs"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert scored["choices"][0]["text"] == prompt and scored["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n_prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
    assert all(v < 0 for v in lp["token_logprobs"][1:])
    assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"][1:])
    with_completion = complete(server, prompt=prompt, max_tokens=3, echo=True, logprobs=1, ignore_eos=True)
    lp2 = with_completion["choices"][0]["logprobs"]
    assert len(lp2["tokens"]) == n_prompt + 3
    # The same prompt scored twice, alone each time: equal up to kernel choice (bf16 on some CPUs).
    assert lp2["token_logprobs"][1:n_prompt] == pytest.approx(lp["token_logprobs"][1:], abs=1e-3)


def validate_legacy_chunk(chunk: dict) -> None:
    """A streamed text_completion chunk against the schema. The spec says chunks share the body's shape,
    but OpenAI's streams (and every client) have `finish_reason: null` until the last chunk of a choice
    and `usage: null` with include_usage: those two nulls are the only allowed departures."""
    chunk = {k: v for k, v in chunk.items() if not (k == "usage" and v is None)}
    chunk["choices"] = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
    validate(chunk, "CreateCompletionResponse")


def test_completion_stream_with_the_openai_sdk(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as client:
        whole = client.completions.create(model=MODEL, prompt="Era uma vez", max_tokens=8, temperature=0)
        pieces, finish, usage = [], None, None
        for chunk in client.completions.create(
            model=MODEL,
            prompt="Era uma vez",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            validate_legacy_chunk(chunk.model_dump(exclude_unset=True))
            for c in chunk.choices:
                pieces.append(c.text)
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
        assert "".join(pieces) == whole.choices[0].text
        assert finish == whole.choices[0].finish_reason
        assert usage.completion_tokens == whole.usage.completion_tokens


def test_completion_bad_input(server):
    r = post(server, {"model": MODEL, "prompt": "x", "suffix": "y"}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    validate(r.json(), "ErrorResponse")
    r = post(server, {"model": MODEL, "prompt": "x", "max_tokens": 1000}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "in the prompt" in r.json()["error"]["message"]
    r = post(server, {"model": MODEL, "prompt": [5, 999999]}, path="/v1/completions")
    assert r.status_code == 400 and "token id 999999 is out of range" in r.json()["error"]["message"]


# -- tool history, auth, models ------------------------------------------------------------------------
def test_tool_role_and_assistant_tool_calls_in_history(server):
    call = {"id": "call_1", "type": "function", "function": {"name": "clima", "arguments": '{"cidade": "Porto"}'}}
    messages = [
        {"role": "user", "content": "Como está o tempo no Porto?", "name": "ana"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 graus"},
    ]
    body = chat(server, messages=messages, max_tokens=3)
    assert body["usage"]["completion_tokens"] >= 1


def test_several_keys_every_v1_route_and_open_health(server):
    for key in (API_KEY, SECOND_KEY):
        assert (
            post(
                server, {"model": MODEL, "messages": USER, "max_tokens": 1}, headers={"Authorization": f"Bearer {key}"}
            ).status_code
            == 200
        )
    for method, path in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", f"/v1/models/{MODEL}"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
            r = httpx.request(method, server.base_url + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers)
            validate(r.json(), "ErrorResponse")
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_model_retrieve_and_unknown_names_served(server):
    r = httpx.get(f"{server.base_url}/v1/models/{MODEL}", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == MODEL
    validate(r.json(), "Model")
    r = httpx.get(f"{server.base_url}/v1/models/gpt-4o", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    validate(r.json(), "ErrorResponse")
    # Not strict: a client that sends another model's name is served, and told which model answered.
    body = post(server, {"model": "gpt-4o-mini", "messages": USER, "max_tokens": 1}).json()
    assert body["model"] == MODEL


# -- disconnects -------------------------------------------------------------------------------------
def wait_running(server, want: int) -> float:
    return wait_gauge(server, "ptserve_running_sequences", want)


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_goes_away_frees_its_sequence(server, stream):
    body = json.dumps(
        {"model": MODEL, "messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": stream}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    assert wait_running(server, 0) == 0
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(request)
        assert wait_running(server, 1) == 1  # generating
    finally:
        sock.close()  # the client goes away mid-generation
    assert wait_running(server, 0) == 0  # the engine dropped the sequence
    assert chat(server, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_openai_sdk_reads_n_and_logprobs(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=SECOND_KEY, max_retries=0) as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            n=2,
            logprobs=True,
            top_logprobs=2,
            max_tokens=4,
            temperature=1.0,
            seed=5,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in reply.choices] == [0, 1] and reply.usage.completion_tokens == 8
        for choice in reply.choices:
            assert len(choice.logprobs.content) == 4 and choice.finish_reason == "length"
            assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
