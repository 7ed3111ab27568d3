"""Tier 3: the other dialects over loopback, through their own clients: Anthropic's Messages API (the
`anthropic` SDK and raw SSE), vLLM's /tokenize and /detokenize, and the context window in /v1/models.
Answers equal the OpenAI route's for the same conversation (greedy), token counts equal its usage."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.conftest import API_KEY, TEST_CONTEXT
from tests.openai_schema import validate
from tests.schemas import PERSON, WEATHER

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "Olá! Como está o tempo?"}]
GREEDY = {"temperature": 0}  # today's SDK has no temperature argument; the Messages API still takes it
WEATHER_TOOL = {"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER}


@pytest.fixture(scope="module")
def claude(server):
    with anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0) as client:
        yield client


def openai_chat(server, **fields) -> dict:
    body = {"model": "m", "messages": USER, "temperature": 0, **fields}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# -- sizes and tokens ---------------------------------------------------------------------------------------
def test_models_carry_the_context_window(server):
    listed = httpx.get(server.base_url + "/v1/models", headers=AUTH).json()
    for model in listed["data"]:
        validate(model, "Model")
        assert (model["max_model_len"], model["context_length"]) == (TEST_CONTEXT, TEST_CONTEXT)


def test_tokenize_counts_what_a_chat_request_uses(server, tokenizer):
    chat = openai_chat(server, max_tokens=1)
    r = httpx.post(server.base_url + "/tokenize", json={"model": "m", "messages": USER}, headers=AUTH)
    assert r.status_code == 200
    assert r.json()["count"] == len(r.json()["tokens"]) == chat["usage"]["prompt_tokens"]
    assert r.json()["max_model_len"] == TEST_CONTEXT and r.json()["token_strs"] is None
    text = httpx.post(
        server.base_url + "/tokenize", json={"prompt": "Olá mundo", "return_token_strs": True}, headers=AUTH
    ).json()
    assert text["tokens"] == tokenizer("Olá mundo", add_special_tokens=False)["input_ids"]
    assert text["token_strs"] == tokenizer.convert_ids_to_tokens(text["tokens"])
    back = httpx.post(server.base_url + "/detokenize", json={"tokens": text["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": "Olá mundo"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role"),
        ("/detokenize", {"tokens": [1, 99999]}, "tokens.[1]"),
    ],
)
def test_token_routes_refuse_bad_input_and_serve_on(server, path, body, param):
    r = httpx.post(server.base_url + path, json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    validate(r.json(), "ErrorResponse")
    assert httpx.post(server.base_url + "/tokenize", json={"prompt": "x"}, headers=AUTH).status_code == 200


# -- Anthropic's Messages API -------------------------------------------------------------------------------
def test_messages_create_equals_the_chat_route(server, claude):
    chat = openai_chat(server, max_tokens=8)
    reply = claude.messages.create(model="m", max_tokens=8, messages=USER, extra_body=GREEDY)
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text == chat["choices"][0]["message"]["content"]
    assert (reply.stop_reason, reply.stop_sequence) == ("max_tokens", None)
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat["usage"]["prompt_tokens"], 8)
    counted = claude.messages.count_tokens(model="m", messages=USER)
    assert counted.input_tokens == chat["usage"]["prompt_tokens"]


def test_messages_stream_events_in_anthropics_order(server, claude):
    whole = claude.messages.create(model="m", max_tokens=10, messages=USER, extra_body=GREEDY)
    body = {"model": "m", "max_tokens": 10, "messages": USER, "temperature": 0, "stream": True}
    r = httpx.post(server.base_url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    kinds = [kind for kind, _ in events]
    assert kinds[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(kind == data["type"] for kind, data in events)
    start = events[0][1]["message"]
    assert start["usage"] == {"input_tokens": whole.usage.input_tokens, "output_tokens": 0}
    text = "".join(d["delta"]["text"] for k, d in events if k == "content_block_delta")
    assert text == whole.content[0].text
    assert events[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"output_tokens": 10}
    with claude.messages.stream(model="m", max_tokens=10, messages=USER, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"


def test_a_stop_sequence_is_named(claude):
    whole = claude.messages.create(model="m", max_tokens=12, messages=USER, extra_body=GREEDY).content[0].text
    stop = whole[4:7]
    reply = claude.messages.create(model="m", max_tokens=12, messages=USER, extra_body=GREEDY, stop_sequences=[stop])
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
    assert reply.content[0].text == whole[: whole.index(stop)]


def test_tool_use_round_trip(claude):
    first = [{"role": "user", "content": "Tempo em Lisboa?"}]
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    call = claude.messages.create(
        model="m", max_tokens=100, messages=first, tools=[WEATHER_TOOL], tool_choice=choice, extra_body=GREEDY
    )
    assert call.stop_reason == "tool_use" and [b.type for b in call.content] == ["tool_use"]
    [use] = call.content
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    with claude.messages.stream(
        model="m", max_tokens=100, messages=first, tools=[WEATHER_TOOL], tool_choice=choice, extra_body=GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    assert [(b.name, b.input) for b in streamed.content] == [(use.name, use.input)]
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 °C, sol"}
    history = [*first, {"role": "assistant", "content": call.content}, {"role": "user", "content": [result]}]
    answer = claude.messages.create(model="m", max_tokens=5, messages=history, tools=[WEATHER_TOOL], extra_body=GREEDY)
    assert answer.usage.input_tokens > call.usage.input_tokens
    assert (
        answer.usage.input_tokens
        == claude.messages.count_tokens(model="m", messages=history, tools=[WEATHER_TOOL]).input_tokens
    )


def test_messages_errors_in_anthropics_shape_and_the_server_serves_on(server, claude):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [image]}])
    assert err.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Invalid 'messages.0.content.0.type': this model reads text only; image blocks cannot be used.",
        },
    }
    with pytest.raises(anthropic.BadRequestError, match="'temperature': it must be between 0 and 1"):
        claude.messages.create(model="m", max_tokens=5, messages=USER, extra_body={"temperature": 1.5})
    with (
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0) as stranger,
        pytest.raises(anthropic.AuthenticationError) as denied,
    ):
        stranger.messages.create(model="m", max_tokens=5, messages=USER)
    assert denied.value.body["error"]["type"] == "authentication_error"
    over = httpx.post(
        server.base_url + "/v1/messages",
        json={"model": "m", "max_tokens": TEST_CONTEXT, "messages": USER},
        headers={"x-api-key": API_KEY},
    )
    assert over.status_code == 400 and over.json()["error"]["type"] == "invalid_request_error"
    assert "maximum context length is 512 tokens" in over.json()["error"]["message"]
    assert claude.messages.create(model="m", max_tokens=3, messages=USER).usage.output_tokens == 3


def test_structured_output_through_output_config(claude):
    person = PERSON
    reply = claude.messages.create(
        model="m",
        max_tokens=60,
        messages=[{"role": "user", "content": "Invente uma pessoa."}],
        output_config={"format": {"type": "json_schema", "schema": person}, "effort": "low"},
        extra_body=GREEDY,
    )
    assert reply.stop_reason == "end_turn"
    jsonschema.validate(json.loads(reply.content[0].text), person)


# -- OpenAI's Responses API ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


RESPONSE_TOOL = {"type": "function", "name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}


def test_responses_create_equals_the_chat_route(server, client):
    chat = openai_chat(server, max_tokens=8)
    reply = client.responses.create(model="m", input=USER[0]["content"], max_output_tokens=8, temperature=0)
    body = reply.model_dump(mode="json", exclude_none=False)
    validate(httpx_response(server, input=USER[0]["content"], max_output_tokens=8, temperature=0), "Response")
    assert reply.output_text == chat["choices"][0]["message"]["content"]
    assert (reply.status, body["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat["usage"]["prompt_tokens"], 8)
    done = client.responses.create(model="m", input=USER, instructions="Seja breve.", max_output_tokens=8)
    assert done.instructions == "Seja breve." and done.usage.input_tokens != reply.usage.input_tokens


def httpx_response(server, **fields) -> dict:
    r = httpx.post(server.base_url + "/v1/responses", json={"model": "m", **fields}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_responses_stream_events(server, client):
    whole = client.responses.create(model="m", input="Olá", max_output_tokens=10, temperature=0)
    body = {"model": "m", "input": "Olá", "max_output_tokens": 10, "temperature": 0, "stream": True}
    r = httpx.post(server.base_url + "/v1/responses", json=body, headers=AUTH, timeout=60)
    events = sse_events(r.text)
    for kind, data in events:
        assert kind == data["type"]
        validate(data, "ResponseStreamEvent")
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    kinds = [kind for kind, _ in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    text = "".join(d["delta"] for k, d in events if k == "response.output_text.delta")
    assert text == whole.output_text == events[-1][1]["response"]["output"][0]["content"][0]["text"]
    # The SDK's helper wants response.completed: an answer its grammar ends (a random model never stops).
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}
    ended = client.responses.create(model="m", input="Olá", text=fmt, max_output_tokens=60, temperature=0)
    with client.responses.stream(model="m", input="Olá", text=fmt, max_output_tokens=60, temperature=0) as stream:
        final = stream.get_final_response()
    assert (final.status, final.output_text) == ("completed", ended.output_text)


def test_responses_tool_call_round_trip_and_structured_output(client):
    # One call, forced: a random model would otherwise call on and on (or never).
    forced = dict(
        input="Tempo em Lisboa?",
        tools=[RESPONSE_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=100,
        temperature=0,
    )
    call = client.responses.create(model="m", **forced)
    [item] = call.output
    assert item.type == "function_call" and item.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(item.arguments), WEATHER)
    with client.responses.stream(model="m", **forced) as stream:
        streamed = stream.get_final_response()
    assert [(i.name, i.arguments) for i in streamed.output] == [(item.name, item.arguments)]
    history = [
        {"role": "user", "content": "Tempo em Lisboa?"},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": "18 °C, sol"},
    ]
    answer = client.responses.create(model="m", input=history, tools=[RESPONSE_TOOL], max_output_tokens=5)
    assert answer.usage.input_tokens > call.usage.input_tokens
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    person = client.responses.create(model="m", input="Invente uma pessoa.", text=fmt, max_output_tokens=60)
    assert person.status == "completed"
    jsonschema.validate(json.loads(person.output_text), PERSON)


def test_responses_refuse_state_and_images_and_serve_on(client):
    with pytest.raises(openai.BadRequestError, match="stores no responses") as err:
        client.responses.create(model="m", input="Olá", previous_response_id="resp_123")
    assert err.value.body["param"] == "previous_response_id"
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}
    with pytest.raises(openai.BadRequestError, match="this model reads text only") as err:
        client.responses.create(model="m", input=[image])
    assert err.value.body["param"] == "input[0].content[0].type"
    kept = client.responses.create(model="m", input="Olá", store=True, reasoning={"effort": "low"}, max_output_tokens=3)
    assert kept.usage.output_tokens == 3


def test_langchain_with_the_responses_api(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, model="m", use_responses_api=True, max_tokens=6)
    reply = llm.invoke("Olá!")
    assert reply.text and reply.usage_metadata["output_tokens"] == 6
