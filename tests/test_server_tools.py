"""Tier 3: structured output and tool calls over HTTP (tiny random model), stream and not, through raw
HTTP, the openai SDK (including its streaming helper) and LangChain (bind_tools, with_structured_output).

A random model writes gibberish, so every string in these schemas has a maxLength: the grammar then
closes the JSON within a few dozen tokens whatever the model prefers. Nor does it ever pick Phi-3.5's
<|end|> by itself: after a tool call, where another call may follow, requests bias it (END) so that the
model stops wherever the grammar lets it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import API_KEY, served
from tests.openai_schema import validate
from tests.schemas import PERSON, SCHEMAS, TOOLS

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The tools prompt takes ~200 of Phi-3.5's tokens: a 2048-token context."""
    text = f"model:\n  id: {tiny_model_dir}\n  max_context_length: 2048\n"
    with served(tmp_path_factory, "tools", text, ("--api-key", API_KEY)) as srv:
        yield srv


MODEL = "phi-3.5-mini-instruct"
END = {"32007": 30}  # <|end|>: taken as soon as the grammar allows it
USER = [{"role": "user", "content": "Como está o tempo em Lisboa?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def chat(server, **fields) -> dict:
    body = {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 150, **fields}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateChatCompletionResponse")
    return r.json()


def stream(server, **fields) -> list[dict]:
    body = {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 150, "stream": True, **fields}
    chunks = []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line and line != "data: [DONE]":
                chunk = json.loads(line.removeprefix("data: "))
                validate(chunk, "CreateChatCompletionStreamResponse")
                chunks.append(chunk)
    return chunks


def check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert names is None or name in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def accumulate(chunks) -> tuple[list[dict], str | None, str | None]:
    """Tool calls, content and finish reason from chat chunks, checking OpenAI's delta rules."""
    calls: dict[int, dict] = {}
    content, finish = None, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                content = (content or "") + delta["content"]
            for tc in delta.get("tool_calls") or []:
                assert "index" in tc
                if tc["index"] not in calls:  # the first delta of a call names it
                    assert tc["type"] == "function" and tc["id"].startswith("call_") and "name" in tc["function"]
                    calls[tc["index"]] = {"id": tc["id"], "type": "function", "function": dict(tc["function"])}
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                    calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    roles = [c["choices"][0]["delta"].get("role") for c in chunks if c["choices"]]
    assert roles[0] == "assistant" and roles[1:].count("assistant") == 0
    return [calls[i] for i in sorted(calls)], content, finish


# -- tool_choice ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_stream_and_not(server, choice):
    names = {"get_weather"} if isinstance(choice, dict) else None
    body = chat(server, tools=TOOLS, tool_choice=choice, logit_bias=END)
    message, finish = body["choices"][0]["message"], body["choices"][0]["finish_reason"]
    assert (message["content"], finish) == (None, "tool_calls")
    check_calls(message["tool_calls"], names)
    calls, content, finish = accumulate(stream(server, tools=TOOLS, tool_choice=choice, logit_bias=END))
    assert (content, finish) == (None, "tool_calls")
    check_calls(calls, names)
    assert [c["function"] for c in calls] == [c["function"] for c in message["tool_calls"]]


def test_parallel_calls_off_gives_one_call(server):
    body = chat(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=3)
    assert len(body["choices"][0]["message"]["tool_calls"]) == 1


def test_auto_chooses_text_or_calls_and_never_returns_a_call_as_content(server, tokenizer):
    lt = str(tokenizer.convert_tokens_to_ids("<"))  # "<": the only way into a call
    # One call at most: with "<" favoured, a random model would otherwise call on and on.
    called = chat(server, tools=TOOLS, logit_bias={lt: 100}, parallel_tool_calls=False)
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    check_calls(called["choices"][0]["message"]["tool_calls"])
    texted = chat(server, tools=TOOLS, logit_bias={lt: -100}, max_tokens=20)
    message = texted["choices"][0]["message"]
    assert "tool_calls" not in message and not message["content"].lstrip().startswith("<")
    calls, content, finish = accumulate(stream(server, tools=TOOLS, logit_bias={lt: 100}, parallel_tool_calls=False))
    assert finish == "tool_calls" and content is None
    assert [c["function"] for c in calls] == [c["function"] for c in called["choices"][0]["message"]["tool_calls"]]
    calls, content, finish = accumulate(stream(server, tools=TOOLS, logit_bias={lt: -100}, max_tokens=20))
    assert calls == [] and content == message["content"]


def test_tool_choice_none_is_plain_text(server):
    plain = chat(server, max_tokens=12)
    body = chat(server, tools=TOOLS, tool_choice="none", max_tokens=12)
    assert body["choices"][0]["message"] == plain["choices"][0]["message"]  # no tools in the prompt either


# -- response_format ------------------------------------------------------------------------------------
def test_json_schema_stream_and_not(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for temperature in (0, 1.0):
        body = chat(server, response_format=fmt, temperature=temperature, seed=2)
        assert body["choices"][0]["finish_reason"] == "stop"
        content = body["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), PERSON)
        assert " " not in content.replace(json.loads(content)["name"], "")  # compact: no free whitespace
    _, streamed, finish = accumulate(stream(server, response_format=fmt))
    assert finish == "stop" and streamed == chat(server, response_format=fmt)["choices"][0]["message"]["content"]


def test_json_object(server, tokenizer):
    # A random model rarely ends a string; a bias on '"' and '}' lets it close the object quickly.
    bias = {str(tokenizer.convert_tokens_to_ids("<0x22>")): 30, str(tokenizer.convert_tokens_to_ids("}")): 30}
    body = chat(server, response_format={"type": "json_object"}, logit_bias=bias)
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


def test_bad_schema_gets_400(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": USER, "response_format": fmt},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"


def test_constrained_and_free_requests_together(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    alone = chat(server, max_tokens=16)["choices"][0]["message"]["content"]
    jobs = [
        dict(max_tokens=16),
        dict(response_format=fmt),
        dict(tools=TOOLS, tool_choice="required", logit_bias=END),
    ] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        bodies = list(pool.map(lambda fields: chat(server, **fields), jobs))
    for fields, body in zip(jobs, bodies, strict=True):
        message = body["choices"][0]["message"]
        if "response_format" in fields:
            jsonschema.validate(json.loads(message["content"]), PERSON)
        elif "tools" in fields:
            check_calls(message["tool_calls"])
        else:
            assert message["content"] == alone


# -- clients --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_openai_streaming_helper_accumulates_tool_calls(client):
    with client.chat.completions.stream(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=150, temperature=0, logit_bias=END
    ) as events:
        kinds = {event.type for event in events}
        final = events.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds
    call = final.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert final.choices[0].finish_reason == "tool_calls"


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=150)


def test_openai_parse_with_a_pydantic_model(client):
    reply = client.chat.completions.parse(
        model=MODEL, messages=USER, response_format=Person, max_tokens=150, temperature=0
    )
    assert isinstance(reply.choices[0].message.parsed, Person)


class GetWeather(BaseModel):
    """Weather forecast for a city."""

    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server.base_url + "/v1", api_key=API_KEY, model=MODEL, temperature=0, max_tokens=150, logit_bias=END
    )
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Tempo em Lisboa?")
    assert len(message.tool_calls) == 1, (message, message.invalid_tool_calls, message.response_metadata)
    [call] = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    person = llm.with_structured_output(Person).invoke("Invente uma pessoa.")
    assert isinstance(person, Person)
    strict = llm.with_structured_output(Person, method="json_schema", strict=True).invoke("Invente uma pessoa.")
    assert isinstance(strict, Person)


def test_a_call_cut_off_by_max_tokens_is_not_content(server):
    body = chat(server, tools=TOOLS, tool_choice="required", max_tokens=4)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None and "tool_calls" not in choice["message"]
