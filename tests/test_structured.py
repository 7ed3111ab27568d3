"""Tier 1: grammars from response_format/tools, the tools prompt, and the tool-call parser (no model);
tier 2: grammars enforced by the engine on the tiny model, beside unconstrained requests."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ptserve.engine.sampling import SamplingParams
from ptserve.errors import APIError
from ptserve.protocol import validate_request
from ptserve.structured import ToolCallParser, build_grammar, check_grammar, tools_prompt
from tests.schemas import PERSON, SCHEMAS, TOOLS
from tests.test_model import run_engine


def request(**fields):
    return validate_request({"model": "m", "messages": [{"role": "user", "content": "Olá"}], **fields})


# -- tier 1 ----------------------------------------------------------------------------------------------
def test_no_grammar_for_free_text():
    assert build_grammar(request()) is None
    assert build_grammar(request(response_format={"type": "text"})) is None
    assert build_grammar(request(tools=TOOLS, tool_choice="none")) is None
    assert tools_prompt(request(tools=TOOLS, tool_choice="none")) is None


def test_grammars_per_mode():
    schema = build_grammar(
        request(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    )
    assert schema.startswith('start: " "? answer\nanswer: %json {') and '"whitespace_flexible": false' in schema
    required = build_grammar(request(tools=TOOLS, tool_choice="required"))
    assert 'calls: call ("\\n" call)*' in required and "fn_1:" in required and "TEXT" not in required
    named = build_grammar(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}))
    assert '"name\\":\\"now\\"' in named and "get_weather" not in named
    single = build_grammar(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert "calls: call\n" in single
    auto = build_grammar(request(tools=TOOLS))
    assert "answer: calls | TEXT?" in auto
    auto_json = build_grammar(request(tools=TOOLS, response_format={"type": "json_object"}))
    assert "answer: calls | %json" in auto_json


def test_tools_prompt_lists_tools_and_the_call_format():
    text = tools_prompt(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}))
    assert '{"name":"get_weather","description":"Weather forecast","parameters":{"type":"object"' in text
    assert (
        '{"name":"now","description":"The current time","parameters":{"type":"object","properties":{},'
        '"additionalProperties":false}}' in text
    )
    assert "You must call the tool now" in text
    assert text.endswith(
        '<tool_call>\n{"name":"<function name>","arguments":<the arguments as a JSON object>}\n</tool_call>'
    )


def test_bad_schema_is_a_400_naming_where():
    bad = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}}
    req = request(response_format=bad)
    with pytest.raises(APIError) as err:
        check_grammar(build_grammar(req), req)
    assert err.value.param == "response_format.json_schema.schema" and "objekt" in err.value.message
    req = request(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}])
    with pytest.raises(APIError) as err:
        check_grammar(build_grammar(req), req)
    assert err.value.param == "tools"


CALLS_TEXT = (
    '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rio}\\n","days":3}}\n</tool_call>\n'
    '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>'
)


def test_parser_whole_text():
    parsed = ToolCallParser.parse("required", CALLS_TEXT)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.calls] == [
        ("get_weather", '{"city":"Rio}\\n","days":3}'),
        ("now", "{}"),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed.calls)
    assert parsed.content is None
    text = ToolCallParser.parse("auto", "Olá, tudo bem?")
    assert (text.calls, text.content) == ([], "Olá, tudo bem?")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_parser_streams_the_same_calls_in_any_chunking(size):
    parser = ToolCallParser("auto")
    events = []
    for i in range(0, len(CALLS_TEXT), size):
        events += parser.feed(CALLS_TEXT[i : i + size])
    events += parser.finish()
    starts = [e for e in events if e[0] == "call"]
    assert [(e[1], e[3]) for e in starts] == [(0, "get_weather"), (1, "now")]
    args = ["", ""]
    for e in events:
        if e[0] == "arguments":
            args[e[1]] += e[2]
    assert args == ['{"city":"Rio}\\n","days":3}', "{}"]
    assert not any(e[0] == "content" for e in events)


def test_parser_flushes_a_call_cut_short():
    parser = ToolCallParser("required")
    parser.feed('<tool_call>\n{"name":"now","arguments":{"a":')
    parser.finish()
    assert parser.calls[0]["function"]["arguments"] == '{"a":'
    assert not ToolCallParser.parse("required", '<tool_call>\n{"na').is_text
    assert ToolCallParser.parse("auto", "").is_text and not ToolCallParser.parse("auto", "<tool").is_text


# -- tier 2: the engine enforces grammars ---------------------------------------------------------------
@pytest.fixture(scope="module")
def grammar_engine(tiny_model_dir):
    from ptserve.config import load_config
    from ptserve.engine import loader
    from ptserve.engine.grammar import GrammarBackend
    from ptserve.engine.scheduler import Engine

    loaded = loader.load(load_config(None, environ={}, overrides={("model", "id"): str(tiny_model_dir)}))
    backend = GrammarBackend(loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)
    engine = Engine(loaded.model, loaded.max_context_length, grammars=backend).start()
    yield engine, loaded
    engine.shutdown()


def test_constrained_and_free_rows_in_one_batch(grammar_engine):
    from ptserve.prompting import encode_prompt, render_messages

    engine, loaded = grammar_engine
    tok = loaded.tokenizer
    eos = tuple(loaded.eos_token_ids)
    ids = encode_prompt(tok, render_messages(request().messages, "Você é útil."))
    person = build_grammar(
        request(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    )
    calls = build_grammar(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    free = SamplingParams(24, temperature=0.0, stop_token_ids=eos)
    jobs = [
        (ids, free),
        (ids, SamplingParams(60, temperature=0.0, stop_token_ids=eos, grammar=person)),
        (ids, SamplingParams(60, temperature=1.0, seed=4, stop_token_ids=eos, grammar=person)),
        (ids, SamplingParams(120, temperature=0.0, stop_token_ids=eos, grammar=calls)),
        (ids, SamplingParams(120, temperature=1.0, seed=9, stop_token_ids=eos, grammar=calls)),
        (ids, free),
    ]
    together = run_engine(engine, jobs)
    alone = [run_engine(engine, [job])[0] for job in jobs]
    assert together == alone  # a grammar never touches another row's tokens
    assert together[0][0] == together[5][0]
    for tokens, finish in together[1:3]:
        assert finish == "stop"
        jsonschema.validate(json.loads(tok.decode(tokens, skip_special_tokens=True)), PERSON)
    for tokens, finish in together[3:5]:
        assert finish == "stop"
        [call] = ToolCallParser.parse("required", tok.decode(tokens, skip_special_tokens=True)).calls
        schema = SCHEMAS[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_async_decoding_draws_grammar_rows_once_their_last_token_is_read(grammar_engine):
    """With async decoding (`server.async_scheduling`) a pass holding grammar rows is launched before the
    previous pass's tokens are read; its tokens are drawn once they are (the grammars' masks follow them):
    constrained, tool-calling ("auto" and "required"), free and min_tokens rows, greedy and seeded, each
    get the tokens and finish of passes read one by one, and those passes did go ahead."""
    from ptserve.engine.grammar import GrammarBackend
    from ptserve.engine.scheduler import Engine
    from ptserve.prompting import encode_prompt, render_messages

    stepwise, loaded = grammar_engine
    eos = tuple(loaded.eos_token_ids)
    ids = encode_prompt(loaded.tokenizer, render_messages(request().messages, "Você é útil."))
    person = build_grammar(
        request(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    )
    auto = build_grammar(request(tools=TOOLS))
    calls = build_grammar(request(tools=TOOLS, tool_choice="required"))
    [(free, _)] = run_engine(stepwise, [(ids, SamplingParams(24, temperature=0.0, stop_token_ids=eos))])
    jobs = [
        (ids, SamplingParams(24, temperature=0.0, stop_token_ids=eos)),
        (ids, SamplingParams(60, temperature=0.0, stop_token_ids=eos, grammar=person)),
        (ids, SamplingParams(60, temperature=1.0, seed=4, stop_token_ids=eos, grammar=person, logprobs=2)),
        (ids, SamplingParams(40, temperature=0.0, stop_token_ids=eos, grammar=auto)),
        (ids, SamplingParams(120, temperature=1.0, seed=9, stop_token_ids=eos, grammar=calls)),
        (ids, SamplingParams(30, temperature=0.0, stop_token_ids=eos + (free[2],), min_tokens=8)),  # banned at 3
    ]
    want = run_engine(stepwise, jobs)
    backend = GrammarBackend(loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)
    engine = Engine(loaded.model, 4096, grammars=backend, decode_graphs=True, async_decode=True)
    assert engine.decode_mode == "from static buffers, launched a pass ahead"
    launched = {"grammar": 0, "short of min_tokens": 0}
    ahead = engine._run_ahead

    def counting(plan):
        launched["grammar"] += any(r.state.matcher is not None for r, _ in plan)
        launched["short of min_tokens"] += any(r.generated + r.ahead < r.stream.params.min_tokens for r, _ in plan)
        return ahead(plan)

    engine._run_ahead = counting
    engine.start()
    try:
        got = run_engine(engine, jobs)
    finally:
        engine.shutdown()
    assert got == want
    assert [f for _, f in got] == ["length", "stop", "stop", "length", "stop", "length"]
    assert got[5][0][:2] == free[:2] and free[2] not in got[5][0][:8]  # banned until its 8th token
    for tokens, _ in got[1:3]:
        jsonschema.validate(json.loads(loaded.tokenizer.decode(tokens, skip_special_tokens=True)), PERSON)
    assert launched["grammar"] > 20 and launched["short of min_tokens"] >= 5
    assert (engine._inflight, engine.running, engine.blocks.used) == (None, 0, 0)


def test_objects_with_properties_are_closed_unless_they_say_otherwise():
    from ptserve.structured import close_objects

    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}, "c": {"type": "object"}},
        "$defs": {"D": {"properties": {"x": {}}, "additionalProperties": True}},
    }
    assert close_objects(schema) == {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}, "additionalProperties": False},
            "c": {"type": "object"},
        },
        "$defs": {"D": {"properties": {"x": {}}, "additionalProperties": True}},
        "additionalProperties": False,
    }
