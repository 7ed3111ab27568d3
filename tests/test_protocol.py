"""Tier 1: request validation and the one translation to sampling settings (no model)."""

import pytest

from ptserve.config import GenerationSettings
from ptserve.errors import APIError, error_body
from ptserve.protocol import validate_request

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


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
        ({"n": 2}, "n", "less than or equal to 1. Got 2."),
        ({"stream": "yes"}, "stream", "Input should be a valid boolean. Got 'yes'."),
        ({"messages": []}, "messages", "List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role", "Got 'robot'."),
        ({"messages": [{"role": "user"}]}, "messages.[0].content", "Missing required parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.[0].content", ""),
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
    request = validate_request({**GOOD, "frobnicate": 1, "logit_bias": {}})
    assert request.unknown_fields() == ["frobnicate", "logit_bias"]
    assert "frobnicate, logit_bias" in caplog.text


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
