"""Tier 3: Ollama's native API (`/api/*`) over loopback, through the `ollama` Python client and raw NDJSON.
Answers equal the OpenAI routes' for the same conversation (greedy), token counts equal their usage; the
model endpoints describe the tiny model exactly. Tier 1: the request translation, without a server."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest

from ptserve.dialects.ollama import GENERATE, UNSUPPORTED, human_count, to_internal
from tests.conftest import API_KEY, TEST_CONTEXT
from tests.schemas import PERSON

pytestmark = pytest.mark.server  # all but the first test drive the server; that one rides along

AUTH = {"Authorization": f"Bearer {API_KEY}"}
NAME = "phi-3.5-mini-instruct"  # the served name (config default)
LISTED = NAME + ":latest"
USER = [{"role": "user", "content": "Olá! Como está o tempo?"}]
GREEDY = {"temperature": 0}
# Parameters as the ollama client serializes a tool (its Tool model keeps type, required, properties and, of a
# property, type, description, enum, in that order): what the OpenAI route gets too, so the prompts are equal.
CITY = {
    "type": "object",
    "required": ["city"],
    "properties": {"city": {"type": "string", "description": "A city", "enum": ["Lisboa", "Porto"]}},
}
CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}
# Ollama cannot force a call; these OpenAI fields (our extension) do, and end it after one call.
FORCED = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False}


@pytest.fixture(scope="module")
def client(server):
    with ollama.Client(host=server.base_url, headers=AUTH) as c:
        yield c


def openai(server, path: str = "/v1/chat/completions", **fields) -> dict:
    body = {"model": "m", "temperature": 0, **fields}
    if path.endswith("chat/completions"):
        body.setdefault("messages", USER)
    r = httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ndjson(server, path: str, body: dict) -> list[dict]:
    """A streamed Ollama response, line by line; every line also parses as the client's own type."""
    with httpx.stream("POST", server.base_url + path, json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        text = r.read().decode()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    kind = ollama.ChatResponse if path == "/api/chat" else ollama.GenerateResponse
    for line in lines:
        kind(**line)
    return lines


def check_timings(reply) -> None:
    parts = (reply.total_duration, reply.prompt_eval_duration, reply.eval_duration)
    assert all(isinstance(t, int) and t > 0 for t in parts) and reply.load_duration == 0
    assert abs(reply.total_duration - reply.prompt_eval_duration - reply.eval_duration) <= 2


# -- tier 1: the translation ----------------------------------------------------------------------------
class Names:
    model_names = [NAME]

    def response_model(self, requested):
        return requested if requested in self.model_names else NAME


def test_translation_of_options_format_and_history():
    body = {
        "model": LISTED,
        "messages": [
            {"role": "user", "content": "Tempo?"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "now", "arguments": {}}}]},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "1", "tool_name": "f"},
            {"role": "tool", "content": "2"},
            {"role": "tool", "content": "3", "tool_name": "g"},
        ],
        "tools": [],
        "format": "json",
        "options": {"num_predict": -1, "repeat_penalty": 1.1, "temperature": 1, "num_ctx": 4096, "stop": ["x"]},
        "keep_alive": "5m",
        "think": False,
    }
    assert to_internal(body, "chat", Names()) == {
        "model": NAME,
        "repetition_penalty": 1.1,
        "temperature": 1.0,
        "stop": ["x"],
        "stream": True,
        "messages": [
            {"role": "user", "content": "Tempo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "now", "arguments": "{}"}}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "1"},  # by its function's name
            {"role": "tool", "tool_call_id": "call_0", "content": "2"},  # the first call still unanswered
            {"role": "user", "content": '<tool_response name="g">\n3\n</tool_response>'},  # answers none
        ],
        "response_format": {"type": "json_object"},
    }
    generate = {"model": "m", "prompt": "p", "system": "s", "stream": False, "format": PERSON, "logprobs": True}
    assert to_internal(generate, GENERATE, Names()) == {
        "model": "m",
        "stream": False,
        "logprobs": True,
        "top_logprobs": 0,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": PERSON}},
    }
    raw = {"model": "m", "prompt": "p", "raw": True, "options": {"num_predict": 3, "seed": 7}}
    assert to_internal(raw, GENERATE, Names()) == {
        "model": "m",
        "max_tokens": 3,
        "seed": 7,
        "stream": True,
        "prompt": "p",
    }
    assert [human_count(n) for n in (3_821_079_552, 7_000_000_000, 4_186_432, 137_000_000, 999)] == [
        "3.8B",
        "7B",
        "4.2M",
        "137M",
        "999",
    ]


# -- tier 3: the model endpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parameters(tiny_model_dir) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())


def test_version_tags_show_and_ps(server, client, parameters, tokenizer):
    assert httpx.get(server.base_url + "/api/version").json() == {"version": "0.9.0"}  # no key needed
    details = {
        "parent_model": "",
        "format": "safetensors",
        "family": "phi3",
        "families": ["phi3"],
        "parameter_size": human_count(parameters),
        "quantization_level": "F32",  # the test server loads the weights in float32
    }
    [listed] = client.list().models
    assert (listed.model, listed.size, listed.details.model_dump()) == (LISTED, parameters * 4, details)
    assert len(listed.digest) == 64 and int(listed.digest, 16) >= 0 and listed.modified_at.year >= 2024
    tags = httpx.get(server.base_url + "/api/tags", headers=AUTH).json()["models"][0]
    assert tags["name"] == tags["model"] == LISTED

    for name in (NAME, LISTED):
        shown = client.show(name)
        assert shown.capabilities == ["completion", "tools"] and shown.details.model_dump() == details
        assert shown.modelinfo["general.architecture"] == "phi3"
        assert shown.modelinfo["phi3.context_length"] == TEST_CONTEXT
        assert shown.modelinfo["general.parameter_count"] == parameters
        assert (shown.modelinfo["phi3.embedding_length"], shown.modelinfo["phi3.block_count"]) == (64, 2)
        assert shown.template == tokenizer.chat_template
        assert shown.parameters.splitlines() == [
            f"num_ctx                        {TEST_CONTEXT}",
            "num_predict                    500",
            "temperature                    0.1",
            "top_p                          1",
        ]
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3.2")
    assert missing.value.status_code == 404
    assert missing.value.error == f"model 'llama3.2' not found; this server serves: {LISTED}."

    [running] = client.ps().models
    assert (running.model, running.name, running.context_length) == (LISTED, LISTED, TEST_CONTEXT)
    assert running.size == parameters * 4 and running.expires_at.year == 9999


# -- tier 3: /api/chat ----------------------------------------------------------------------------------
def test_chat_equals_the_chat_route_streamed_or_not(server, client):
    chat = openai(server, max_tokens=8)
    reply = client.chat(model=NAME, messages=USER, options={**GREEDY, "num_predict": 8})
    assert reply.model == NAME and reply.done and reply.done_reason == "length"
    assert reply.message.role == "assistant" and reply.message.tool_calls is None
    assert reply.message.content == chat["choices"][0]["message"]["content"]
    assert (reply.prompt_eval_count, reply.eval_count) == (chat["usage"]["prompt_tokens"], 8)
    check_timings(reply)

    parts = list(client.chat(model=LISTED, messages=USER, options={**GREEDY, "num_predict": 8}, stream=True))
    *pieces, last = parts
    assert all(not p.done and p.model == LISTED for p in pieces) and len(pieces) >= 1
    assert "".join(p.message.content for p in pieces) == reply.message.content
    assert (last.done, last.done_reason, last.message.content) == (True, "length", "")
    assert (last.prompt_eval_count, last.eval_count) == (reply.prompt_eval_count, 8)
    check_timings(last)

    lines = ndjson(server, "/api/chat", {"model": "m", "messages": USER, "options": {**GREEDY, "num_predict": 8}})
    assert all(set(line) == {"model", "created_at", "message", "done"} for line in lines[:-1])  # streams by default
    assert "".join(line["message"]["content"] for line in lines) == reply.message.content
    assert lines[-1]["model"] == LISTED  # another name is served as the served one


def test_logprobs_as_the_chat_route_gives_them(server, client):
    chat = openai(server, max_tokens=4, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    options = {**GREEDY, "num_predict": 4}
    reply = client.chat(model=NAME, messages=USER, options=options, logprobs=True, top_logprobs=2)
    assert [(lp.token, lp.logprob) for lp in reply.logprobs] == [(lp["token"], lp["logprob"]) for lp in chat]
    assert [len(lp.top_logprobs) for lp in reply.logprobs] == [2, 2, 2, 2]
    streamed = client.chat(model=NAME, messages=USER, options=options, logprobs=True, top_logprobs=2, stream=True)
    assert [lp.token for part in streamed for lp in part.logprobs or []] == [lp["token"] for lp in chat]


def test_a_stop_string_ends_with_stop(client):
    whole = client.chat(model=NAME, messages=USER, options={**GREEDY, "num_predict": 12}).message.content
    stop = whole[4:7]
    reply = client.chat(model=NAME, messages=USER, options={**GREEDY, "num_predict": 12, "stop": [stop]})
    assert (reply.done_reason, reply.message.content) == ("stop", whole[: whole.index(stop)])


def test_format_takes_a_json_schema(server, client):
    person = [{"role": "user", "content": "Invente uma pessoa."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chat = openai(server, messages=person, response_format=fmt, max_tokens=60)
    reply = client.chat(model=NAME, messages=person, format=PERSON, options={**GREEDY, "num_predict": 60})
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), PERSON)
    assert reply.message.content == chat["choices"][0]["message"]["content"]
    streamed = client.chat(
        model=NAME, messages=person, format=PERSON, options={**GREEDY, "num_predict": 60}, stream=True
    )
    assert "".join(p.message.content for p in streamed) == reply.message.content


def test_tool_calls_come_back_with_object_arguments(server, client):
    body = {"model": NAME, "messages": USER, "tools": [CITY_TOOL], **FORCED, "options": {**GREEDY, "num_predict": 60}}
    r = httpx.post(server.base_url + "/api/chat", json={**body, "stream": False}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    reply = ollama.ChatResponse(**r.json())
    assert (reply.done_reason, reply.message.content) == ("stop", "")
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments["city"] in ("Lisboa", "Porto")
    jsonschema.validate(dict(call.function.arguments), CITY)
    openai_call = openai(server, tools=[CITY_TOOL], max_tokens=60, **FORCED)["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(openai_call["function"]["arguments"]) == call.function.arguments
    assert r.json()["message"]["tool_calls"][0]["function"]["index"] == 0

    lines = ndjson(server, "/api/chat", body)
    calls = [c for line in lines for c in line["message"].get("tool_calls") or []]
    assert [c["function"]["arguments"] for c in calls] == [call.function.arguments]
    assert "".join(line["message"]["content"] for line in lines) == ""
    assert (lines[-1]["done"], lines[-1]["done_reason"], lines[-1]["eval_count"]) == (True, "stop", reply.eval_count)

    # The result goes back as Ollama sends it (no call ids, `tool_name`): the prompt is the chat route's.
    history = [*USER, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_name": "get_weather"}]
    history[-1]["content"] = "18 °C, sol"
    answer = client.chat(model=NAME, messages=history, tools=[CITY_TOOL], options={**GREEDY, "num_predict": 3})
    arguments = json.dumps(call.function.arguments, separators=(",", ":"))
    same = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "18 °C, sol"},
    ]
    chat = openai(server, messages=same, tools=[CITY_TOOL], max_tokens=3)
    assert answer.prompt_eval_count == chat["usage"]["prompt_tokens"] > reply.prompt_eval_count
    assert answer.message.content == (chat["choices"][0]["message"]["content"] or "")


def test_tools_without_forcing_leave_the_choice_to_the_model(server, client):
    reply = client.chat(model=NAME, messages=USER, tools=[CITY_TOOL], options={**GREEDY, "num_predict": 10})
    chat = openai(server, tools=[CITY_TOOL], max_tokens=10)["choices"][0]
    assert chat["finish_reason"] == "length" and reply.done_reason == "length"
    assert reply.message.content == chat["message"]["content"] and reply.message.tool_calls is None


# -- tier 3: /api/generate ------------------------------------------------------------------------------
def test_generate_is_a_one_turn_chat_or_raw_text(server, client):
    chat = openai(server, messages=[{"role": "system", "content": "Seja breve."}, *USER], max_tokens=6)
    reply = client.generate(
        model=NAME, prompt=USER[0]["content"], system="Seja breve.", options={**GREEDY, "num_predict": 6}
    )
    assert (reply.response, reply.done_reason) == (chat["choices"][0]["message"]["content"], "length")
    assert (reply.prompt_eval_count, reply.eval_count, reply.context) == (chat["usage"]["prompt_tokens"], 6, None)
    check_timings(reply)
    streamed = list(
        client.generate(
            model=NAME,
            prompt=USER[0]["content"],
            system="Seja breve.",
            options={**GREEDY, "num_predict": 6},
            stream=True,
        )
    )
    assert "".join(p.response for p in streamed) == reply.response and streamed[-1].eval_count == 6

    text = openai(server, "/v1/completions", prompt="Era uma vez", max_tokens=5)
    raw = client.generate(model=NAME, prompt="Era uma vez", raw=True, options={**GREEDY, "num_predict": 5})
    assert (raw.response, raw.done_reason) == (text["choices"][0]["text"], "length")
    assert (raw.prompt_eval_count, raw.eval_count) == (text["usage"]["prompt_tokens"], 5)
    lines = ndjson(
        server,
        "/api/generate",
        {"model": NAME, "prompt": "Era uma vez", "raw": True, "options": {"num_predict": 5, **GREEDY}},
    )
    assert "".join(line["response"] for line in lines) == raw.response and lines[-1]["done_reason"] == "length"


def test_nothing_to_generate_loads_the_model(client):
    loaded = client.generate(model=NAME)
    assert (loaded.model, loaded.response, loaded.done, loaded.done_reason) == (NAME, "", True, "load")
    unloaded = client.chat(model=LISTED, messages=[], keep_alive=0)
    assert (unloaded.model, unloaded.message.content, unloaded.done_reason) == (LISTED, "", "unload")
    assert client.chat(model=NAME, messages=USER, options={"num_predict": 2}).eval_count == 2  # still loaded


# -- tier 3: errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda c: c.chat(model=NAME, messages=[{"role": "robot", "content": "x"}]),
            "Invalid 'messages[0].role': expected system, user, assistant or tool; got 'robot'.",
        ),
        (
            lambda c: c.chat(model=NAME, messages=USER, options={"temperature": 5}, stream=True).__next__(),
            "Invalid value for 'options.temperature': Input should be less than or equal to 2. Got 5.0.",
        ),
        (
            lambda c: c.chat(model=NAME, messages=USER, options={"num_predict": TEST_CONTEXT}),
            f"This model's maximum context length is {TEST_CONTEXT} tokens. However, you requested 546 tokens "
            f"(34 in the messages, {TEST_CONTEXT} in the completion). Please reduce the length of the messages or "
            "completion.",
        ),
        (
            lambda c: c.generate(model=NAME, prompt="def f(", suffix="return 1"),
            "Invalid 'suffix': this model has no fill-in-the-middle mode; send the text to continue in 'prompt'.",
        ),
        (
            lambda c: c.generate(model=NAME, prompt="Olá", raw=True, format="json"),
            "Invalid 'format': structured output needs the chat template; leave out 'raw' (or 'format').",
        ),
        (
            lambda c: c.chat(model=NAME, messages=USER, options={"num_predict": 0}),
            "Invalid value for 'options.num_predict': Input should be greater than or equal to 1. Got 0.",
        ),
        (
            lambda c: c.generate(model=NAME, prompt="Olá", images=["iVBORw0KGgo="]),
            "Invalid 'images': this model reads text only; images cannot be used.",
        ),
    ],
)
def test_bad_requests_get_400_in_ollamas_shape_and_the_server_serves_on(client, call, message):
    with pytest.raises(ollama.ResponseError) as err:
        call(client)
    assert (err.value.status_code, err.value.error) == (400, message)
    assert client.chat(model=NAME, messages=USER, options={"num_predict": 2}).eval_count == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"model": NAME, "messages": USER, "format": "yaml"},
            "Invalid 'format': expected \"json\" or a JSON schema, got 'yaml'.",
        ),
        ({"messages": USER}, "Missing required parameter: 'model'."),
        ({"model": NAME, "messages": USER, "stream": "no"}, "Invalid 'stream': expected true or false, got 'no'."),
        ([1], "The request body must be a JSON object, got list."),
    ],
)
def test_what_the_client_would_not_send_gets_400_too(server, body, message):
    r = httpx.post(server.base_url + "/api/chat", json=body, headers=AUTH)
    assert (r.status_code, r.json()) == (400, {"error": message})


def test_a_wrong_key_gets_401(server):
    with ollama.Client(host=server.base_url) as stranger, pytest.raises(ollama.ResponseError) as err:
        stranger.list()
    assert err.value.status_code == 401
    assert err.value.error.startswith("Incorrect API key provided.")


def test_what_one_chat_model_cannot_do_gets_501(client):
    calls = {
        "/api/embed": lambda: client.embed(model=NAME, input="x"),
        "/api/embeddings": lambda: client.embeddings(model=NAME, prompt="x"),
        "/api/pull": lambda: client.pull("llama3.2"),
        "/api/push": lambda: client.push(NAME),
        "/api/create": lambda: client.create("mine", from_=NAME),
        "/api/copy": lambda: client.copy(NAME, "mine"),
        "/api/delete": lambda: client.delete(NAME),
    }
    assert set(calls) == set(UNSUPPORTED)
    for path, call in calls.items():
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert (err.value.status_code, err.value.error) == (
            501,
            f"{path} is not supported: {UNSUPPORTED[path][1]}. Served models: {LISTED}.",
        )
    assert err.value.error == (
        "/api/delete is not supported: the served model is set in the server's configuration and cannot be "
        f"deleted. Served models: {LISTED}."
    )
    assert client.chat(model=NAME, messages=USER, options={"num_predict": 2}).eval_count == 2


def test_pulling_the_served_model_succeeds_at_once(client):
    assert client.pull(LISTED).status == "success"
    assert [p.status for p in client.pull(NAME, stream=True)] == ["success"]
