"""Tier 3: the real server over loopback (tiny model), driven by raw HTTP and the official openai SDK.

Every body is validated against the official OpenAI schema. Values are exact: greedy decoding on the
tiny model is deterministic, and prompt token counts are recomputed here with the same tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import openai
import pytest

from ptserve.config import DEFAULT_SYSTEM_PROMPT
from tests.conftest import API_KEY, TEST_CONTEXT
from tests.openai_schema import validate

pytestmark = pytest.mark.server

MODEL = "phi-3.5-mini-instruct"
USER = [{"role": "user", "content": "Olá, tudo bem?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def prompt_len(tokenizer, messages, system=DEFAULT_SYSTEM_PROMPT) -> int:
    if system and not any(m["role"] in ("system", "developer") for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def post(server, body, headers=AUTH, path="/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def stream_frames(server, body) -> list[str]:
    """The raw SSE `data:` payloads, in order."""
    frames = []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                frames.append(line.removeprefix("data: "))
    return frames


def chat(server, **fields) -> dict:
    r = post(server, {"model": MODEL, "messages": USER, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    return body


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as client:
        yield client  # closed after: an open pooled connection warns when collected (warnings are errors)


# -- plumbing -----------------------------------------------------------------------------------------
def test_health_says_503_while_loading_then_200(server):
    # The API answers while the worker still loads the model (worker start-up takes seconds here).
    assert server.health_seen[0] == 503
    assert set(server.health_seen[:-1]) == {503} and server.health_seen[-1] == 200


def test_health_is_open_and_models_listed(server, client):
    assert httpx.get(server.base_url + "/health").status_code == 200  # no key needed
    r = httpx.get(server.base_url + "/v1/models", headers=AUTH)
    validate(r.json(), "ListModelsResponse")
    assert [m.id for m in client.models.list().data] == [MODEL]


def cached_of(prompt_tokens: int) -> int:
    """What the prefix cache holds of a prompt served before: its full 16-token blocks, the last token aside
    (always computed: its position gives the first token)."""
    return (prompt_tokens - 1) // 16 * 16


def test_non_stream_body_usage_and_length(server, tokenizer):
    # never served before, from the first token on (the default system prompt's blocks are cached by now)
    messages = [{"role": "system", "content": f"Teste {uuid.uuid4().hex}."}, *USER]
    first, again = chat(server, max_tokens=8, messages=messages), chat(server, max_tokens=8, messages=messages)
    choice = first["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant" and choice["message"]["refusal"] is None
    prompt = prompt_len(tokenizer, messages)
    assert first["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 8,
        "total_tokens": prompt + 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert cached_of(prompt) >= 32
    assert again["usage"] == {**first["usage"], "prompt_tokens_details": {"cached_tokens": cached_of(prompt)}}
    assert again["choices"] == first["choices"]
    assert first["model"] == MODEL and first["id"].startswith("chatcmpl-")


def test_stream_frames_follow_the_rules(server, tokenizer):
    whole = chat(server, max_tokens=8)["choices"][0]["message"]["content"]  # the prompt is then cached
    frames = stream_frames(
        server,
        {
            "model": MODEL,
            "messages": USER,
            "temperature": 0,
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": prompt_len(tokenizer, USER),
        "completion_tokens": 8,
        "total_tokens": prompt_len(tokenizer, USER) + 8,
        "prompt_tokens_details": {"cached_tokens": cached_of(prompt_len(tokenizer, USER))},
    }
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole


def test_no_usage_chunk_unless_asked(server):
    frames = stream_frames(server, {"model": MODEL, "messages": USER, "max_tokens": 4, "stream": True})
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)


# -- the openai SDK -----------------------------------------------------------------------------------
def test_sdk_stream_equals_non_stream_at_temperature_0(client):
    kwargs = dict(model=MODEL, messages=USER, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason == "length"
    assert usage.completion_tokens == full.usage.completion_tokens == 24
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_sdk_async_concurrent_requests_do_not_mix(server):
    prompts = [f"Pergunta número {i}: o que é {i}?" for i in range(4)]
    aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)

    async def ask(p, stream):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=10)
        if not stream:
            return (await aclient.chat.completions.create(**kwargs)).choices[0].message.content
        out = []
        async for chunk in await aclient.chat.completions.create(**kwargs, stream=True):
            out.append(chunk.choices[0].delta.content or "")
        return "".join(out)

    async def scenario():
        async with aclient:
            alone = [await ask(p, False) for p in prompts]
            together = await asyncio.gather(*(ask(p, i % 2 == 0) for i, p in enumerate(prompts * 2)))
        return alone, together

    alone, together = asyncio.run(scenario())
    assert together == alone * 2
    assert len(set(alone)) > 1  # different prompts really gave different answers


def test_stop_string_is_cut_and_never_returned(client):
    kwargs = dict(model=MODEL, messages=USER, temperature=0, max_tokens=40)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    # a 2-character stop whose first occurrence is in the middle of the text
    start = next(i for i in range(4, len(text) - 2) if text.find(text[i : i + 2]) == i and text[i : i + 2].strip())
    stop = text[start : start + 2]
    cut = client.chat.completions.create(**kwargs, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == text[:start]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 40
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stop=stop, stream=True)
    )
    assert streamed == text[:start]


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=3)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")


# -- prompt rules as the engine sees them (exact prompt token counts) ---------------------------------
def test_default_system_prompt_used_only_without_system_message(server, tokenizer):
    plain = chat(server, max_tokens=1)["usage"]["prompt_tokens"]
    assert plain == prompt_len(tokenizer, USER)
    mine = [{"role": "developer", "content": "Seja breve."}, *USER]
    assert chat(server, messages=mine, max_tokens=1)["usage"]["prompt_tokens"] == prompt_len(tokenizer, mine)
    assert prompt_len(tokenizer, mine) != plain


def test_text_parts_equal_a_string(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Olá,"}, {"type": "text", "text": "tudo bem?"}]}]
    joined = [{"role": "user", "content": "Olá,\ntudo bem?"}]
    a, b = chat(server, messages=parts, max_tokens=6), chat(server, messages=joined, max_tokens=6)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    # the same tokens: the second finds the first's blocks in the prefix cache
    prompt = a["usage"]["prompt_tokens"]
    assert b["usage"] == {**a["usage"], "prompt_tokens_details": {"cached_tokens": cached_of(prompt)}}


def test_unknown_fields_are_accepted(server):
    body = chat(server, max_tokens=2, frobnicate=True, metadata={"a": "b"}, service_tier="auto")
    assert body["usage"]["completion_tokens"] == 2


def test_default_max_tokens_shrinks_to_the_context(server, tokenizer):
    # No max_tokens: the configured 500 does not fit next to this prompt in a 512-token context.
    messages = [{"role": "user", "content": "palavra " * 15}]
    body = chat(server, messages=messages)
    room = TEST_CONTEXT - prompt_len(tokenizer, messages)
    assert room < 500
    assert body["usage"]["completion_tokens"] <= room
    if body["choices"][0]["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == room


# -- errors: the OpenAI envelope, and the server keeps serving ----------------------------------------
def _good_request_still_works(server):
    assert chat(server, max_tokens=2)["usage"]["completion_tokens"] == 2


BAD_BODIES = [
    ("not json", b"{nope", 400, None, "could not parse the JSON body"),
    ("not an object", [1, 2], 400, None, "must be a JSON object, got list"),
    ("no model", {"messages": USER}, 400, "model", "Missing required parameter: 'model'"),
    ("no messages", {"model": MODEL}, 400, "messages", "Missing required parameter: 'messages'"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages", "at least 1 item"),
    (
        "bad role",
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.[0].role",
        "'robot'",
    ),
    ("bad content", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.[0].content", "5"),
    (
        "temperature",
        {"model": MODEL, "messages": USER, "temperature": 5},
        400,
        "temperature",
        "less than or equal to 2. Got 5",
    ),
    ("top_p", {"model": MODEL, "messages": USER, "top_p": 1.5}, 400, "top_p", "less than or equal to 1. Got 1.5"),
    (
        "max_tokens",
        {"model": MODEL, "messages": USER, "max_tokens": 0},
        400,
        "max_tokens",
        "greater than or equal to 1. Got 0",
    ),
    ("n", {"model": MODEL, "messages": USER, "n": 0}, 400, "n", "greater than or equal to 1. Got 0"),
    (
        "logit_bias token",
        {"model": MODEL, "messages": USER, "logit_bias": {"99999": 5}},
        400,
        "logit_bias",
        "token id 99999 is out of range; this model's vocabulary has",
    ),
    (
        "image part",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.[0].content.[0].type",
        "reads text only",
    ),
    (
        "penalty",
        {"model": MODEL, "messages": USER, "presence_penalty": 3},
        400,
        "presence_penalty",
        "less than or equal to 2. Got 3",
    ),
    ("stream type", {"model": MODEL, "messages": USER, "stream": "yes"}, 400, "stream", "valid boolean. Got 'yes'"),
    (
        "too many stops",
        {"model": MODEL, "messages": USER, "stop": list("abcde")},
        400,
        "stop",
        "at most 4 stop sequences are allowed, got 5",
    ),
    (
        "stream_options alone",
        {"model": MODEL, "messages": USER, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "only allowed when 'stream' is true",
    ),
    (
        "completion too long",
        {"model": MODEL, "messages": USER, "max_tokens": 10000},
        400,
        "messages",
        "This model's maximum context length is 512 tokens",
    ),
    (
        "prompt too long",
        {"model": MODEL, "messages": [{"role": "user", "content": "palavra " * 600}]},
        400,
        "messages",
        "This model's maximum context length is 512 tokens",
    ),
]


@pytest.mark.parametrize("name, body, status, param, fragment", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_gets_the_openai_envelope(server, name, body, status, param, fragment):
    if isinstance(body, bytes):
        r = httpx.post(server.base_url + "/v1/chat/completions", content=body, headers=AUTH)
    else:
        r = post(server, body)
    assert r.status_code == status
    validate(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    _good_request_still_works(server)


def test_context_error_names_the_numbers(server, tokenizer):
    r = post(server, {"model": MODEL, "messages": USER, "max_tokens": 500})
    p = prompt_len(tokenizer, USER)
    assert r.json()["error"] == {
        "message": f"This model's maximum context length is {TEST_CONTEXT} tokens. However, you requested "
        f"{p + 500} tokens ({p} in the messages, 500 in the completion). "
        "Please reduce the length of the messages or completion.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_auth_is_required_on_v1(server, headers):
    for r in (
        post(server, {"model": MODEL, "messages": USER}, headers=headers),
        httpx.get(server.base_url + "/v1/models", headers=headers),
    ):
        assert r.status_code == 401
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "invalid_api_key"
    _good_request_still_works(server)


def test_unknown_route_and_method_use_the_envelope(server):
    r = httpx.get(server.base_url + "/v1/nope", headers=AUTH)
    assert r.status_code == 404
    validate(r.json(), "ErrorResponse")
    r = httpx.get(server.base_url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405
    validate(r.json(), "ErrorResponse")
    _good_request_still_works(server)


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=9)
    assert err.value.param == "temperature"
    with openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=USER)


def test_cors_preflight(server):
    r = httpx.options(
        server.base_url + "/v1/chat/completions",
        headers={
            "Origin": "http://example.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://example.test"
