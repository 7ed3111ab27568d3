"""Tier 1: request validation and the one translation to sampling settings (no model)."""

import pytest

from ptserve.config import GenerationSettings
from ptserve.engine.sampling import SamplingParams
from ptserve.errors import APIError, error_body
from ptserve.protocol import validate_completion_request, validate_request

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lisboa"}'}}


def bad(**changes):
    body = {**GOOD, **changes}
    with pytest.raises(APIError) as err:
        validate_request(body)
    assert err.value.status == 400
    return err.value


@pytest.mark.parametrize(
    "changes, param, fragment",
    [
        ({"temperature": 2.5}, "temperature", "Input should be less than or equal to 2. Got 2.5."),
        ({"temperature": "hot"}, "temperature", "Got 'hot'."),
        ({"top_p": 0}, "top_p", "Input should be greater than 0. Got 0."),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1. Got 0."),
        ({"max_completion_tokens": -5}, "max_completion_tokens", "Got -5."),
        ({"n": 0}, "n", "greater than or equal to 1. Got 0."),
        ({"n": 129}, "n", "less than or equal to 128. Got 129."),
        ({"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2. Got 2.5."),
        ({"presence_penalty": -3}, "presence_penalty", "greater than or equal to -2. Got -3."),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20. Got 21."),
        ({"top_logprobs": 2}, "top_logprobs", "requires 'logprobs' to be true"),
        ({"logprobs": 1}, "logprobs", "valid boolean. Got 1."),
        ({"min_p": 1.5}, "min_p", "less than or equal to 1. Got 1.5."),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0. Got 0."),
        ({"min_tokens": -1}, "min_tokens", "Got -1."),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "keys must be token ids (integers as strings), got 'abc'."),
        ({"logit_bias": {"5": 101}}, "logit_bias", "values must be between -100 and 100, got 101."),
        ({"logit_bias": {"5": "x"}}, "logit_bias.5", "Got 'x'."),
        ({"stream": "yes"}, "stream", "Input should be a valid boolean. Got 'yes'."),
        ({"messages": []}, "messages", "List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role", "Got 'robot'."),
        ({"messages": [{"role": "user"}]}, "messages.[0].content", "Missing required parameter"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.[0].content.[0].type",
            "this model reads text only, so content parts of type 'image_url' are not supported (allowed: text)",
        ),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages.[0].content", "Missing required"),
        (
            {"messages": [{"role": "tool", "content": "42"}]},
            "messages.[0].tool_call_id",
            "Missing required parameter: 'messages.[0].tool_call_id'.",
        ),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "call_9"}]},
            "messages.[0].tool_call_id",
            "must be a response to a preceding message with 'tool_calls'; no earlier tool call has id 'call_9'",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
            "messages.[0].tool_calls",
            "only assistant messages carry tool calls (role is 'user')",
        ),
        ({"stop": ""}, "stop", "at least 1 character"),
    ],
)
def test_bad_fields_name_field_limit_and_value(changes, param, fragment):
    err = bad(**changes)
    assert err.param == param
    assert fragment in err.message
    body = error_body(err)
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_missing_model():
    err = bad(model=None)
    assert (err.param, err.code) == ("model", None)
    body = {"messages": GOOD["messages"]}
    with pytest.raises(APIError) as missing:
        validate_request(body)
    assert missing.value.message == "Missing required parameter: 'model'."
    assert missing.value.code == "missing_required_parameter"


def test_stop_limit_and_stream_options_rule():
    assert bad(stop=["a", "b", "c", "d", "e"]).message == (
        "Invalid 'stop': at most 4 stop sequences are allowed, got 5."
    )
    assert bad(stream_options={"include_usage": True}).param == "stream_options"


def test_body_must_be_an_object():
    with pytest.raises(APIError, match="must be a JSON object, got list"):
        validate_request([1, 2])


def test_unknown_fields_are_accepted_and_listed(caplog):
    request = validate_request({**GOOD, "frobnicate": 1, "store": False})
    assert request.unknown_fields() == ["frobnicate", "store"]
    assert "frobnicate, store" in caplog.text


def test_content_parts_and_roles():
    request = validate_request(
        {
            **GOOD,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "name": "bot"},
            ],
        }
    )
    assert [m.text() for m in request.messages] == ["be brief", "a\nb", "ok"]


def test_tool_history_renders_for_phi35():
    from ptserve.prompting import render_messages

    request = validate_request(
        {
            **GOOD,
            "messages": [
                {"role": "user", "content": "Tempo em Lisboa e Porto?"},
                # `index`: the openai SDK's stream helper leaves it on the calls it hands back
                {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2", "index": 1}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "20 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "18 C"}]},
            ],
        }
    )
    call = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Lisboa"}}\n</tool_call>'
    assert render_messages(request.messages, "") == [
        {"role": "user", "content": "Tempo em Lisboa e Porto?"},
        {"role": "assistant", "content": call + "\n" + call},
        {
            "role": "user",
            "content": '<tool_response name="get_weather" id="call_1">\n20 C\n</tool_response>\n'
            '<tool_response name="get_weather" id="call_2">\n18 C\n</tool_response>',
        },
    ]


def test_every_sampling_field_reaches_the_engine():
    body = {
        **GOOD,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "seed": 3,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {"10": -100, "2": 5},
        "min_tokens": 4,
        "logprobs": True,
        "top_logprobs": 3,
    }
    params = validate_request(body).to_sampling_params(GenerationSettings(), max_tokens=9)
    assert params == SamplingParams(
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=3,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias=((2, 5.0), (10, -100.0)),
        min_tokens=4,
        logprobs=3,
    )
    assert validate_request({**GOOD, "logprobs": True}).to_sampling_params(GenerationSettings(), 1).logprobs == 0
    assert validate_request(GOOD).to_sampling_params(GenerationSettings(), 1).logprobs is None


def test_completion_request_rules():
    ok = {"model": "m", "prompt": "Era uma vez"}
    assert validate_completion_request(ok).prompts() == ["Era uma vez"]
    assert validate_completion_request({**ok, "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert validate_completion_request({**ok, "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert validate_completion_request({**ok, "prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    assert validate_completion_request({**ok, "logprobs": 2, "echo": True, "max_tokens": 0}).to_sampling_params(
        GenerationSettings(), 0
    ) == SamplingParams(max_tokens=0, temperature=0.1, logprobs=2)
    for changes, param, fragment in [
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"logprobs": 6}, "logprobs", "less than or equal to 5. Got 6."),
        ({"suffix": "fim"}, "suffix", "no fill-in-the-middle"),
        ({"best_of": 3}, "best_of", "best_of must equal n (1) or be left out; got 3"),
        ({"max_tokens": 0}, "max_tokens", "0 is only useful with 'echo'"),
        ({"prompt": 5}, "prompt", "Got 5."),
    ]:
        with pytest.raises(APIError) as err:
            validate_completion_request({**ok, **changes})
        assert (err.value.param, err.value.status) == (param, 400)
        assert fragment in err.value.message


def test_sampling_precedence_request_then_config():
    defaults = GenerationSettings(max_tokens=500, temperature=0.1, top_p=0.9)
    params = validate_request({**GOOD, "temperature": 0}).to_sampling_params(defaults, max_tokens=7)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.0, 0.9, 7)  # 0 is not "unset"
    params = validate_request(GOOD).to_sampling_params(defaults, max_tokens=500)
    assert (params.temperature, params.top_p, params.seed) == (0.1, 0.9, None)


def test_max_completion_tokens_supersedes_max_tokens():
    request = validate_request({**GOOD, "max_tokens": 10, "max_completion_tokens": 3})
    assert request.requested_max_tokens() == 3
    assert validate_request({**GOOD, "max_tokens": 10}).requested_max_tokens() == 10
    assert validate_request(GOOD).requested_max_tokens() is None


def test_stop_strings_and_usage_flag():
    assert validate_request({**GOOD, "stop": "x"}).stop_strings() == ["x"]
    assert validate_request({**GOOD, "stop": ["x", "y"]}).stop_strings() == ["x", "y"]
    assert validate_request({**GOOD, "stream": True, "stream_options": {"include_usage": True}}).include_usage()
    assert not validate_request({**GOOD, "stream": True}).include_usage()
