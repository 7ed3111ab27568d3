"""Tier 1: prompting rules, detokenization, stop strings, sampling and chunk shapes (no model)."""

import json

import pytest
import torch

from ptserve import streaming
from ptserve.engine.detokenize import StopMatcher
from ptserve.engine.sampling import (
    RowState,
    SamplingParams,
    apply_penalties,
    make_generator,
    min_p_filter,
    next_tokens,
    sample,
    top_p_filter,
)
from ptserve.errors import APIError
from ptserve.prompting import render_messages, resolve_max_tokens
from ptserve.protocol import ChatMessage
from tests.openai_schema import validate


def msgs(*pairs):
    return [ChatMessage(role=r, content=c) for r, c in pairs]


# -- system prompt rule -------------------------------------------------------------------------------
def test_default_system_prompt_is_added_when_none_sent():
    assert render_messages(msgs(("user", "oi")), "SYS") == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "oi"},
    ]


@pytest.mark.parametrize("role", ["system", "developer"])
def test_request_system_or_developer_message_wins(role):
    assert render_messages(msgs((role, "mine"), ("user", "oi")), "SYS") == [
        {"role": "system", "content": "mine"},
        {"role": "user", "content": "oi"},
    ]


def test_empty_system_prompt_turns_it_off():
    assert render_messages(msgs(("user", "oi")), "") == [{"role": "user", "content": "oi"}]


# -- context window -----------------------------------------------------------------------------------
def test_max_tokens_resolution():
    assert resolve_max_tokens(100, None, 500, 4096) == 500
    assert resolve_max_tokens(4000, None, 500, 4096) == 96  # the default shrinks to the room left
    assert resolve_max_tokens(100, 3996, 500, 4096) == 3996


def test_context_errors_carry_openai_message_and_numbers():
    with pytest.raises(APIError) as err:
        resolve_max_tokens(4000, 200, 500, 4096)
    assert err.value.message == (
        "This model's maximum context length is 4096 tokens. However, you requested 4200 tokens "
        "(4000 in the messages, 200 in the completion). Please reduce the length of the messages or completion."
    )
    assert (err.value.param, err.value.code) == ("messages", "context_length_exceeded")
    with pytest.raises(APIError, match="your messages resulted in 4096 tokens"):
        resolve_max_tokens(4096, None, 500, 4096)


# -- stop strings -------------------------------------------------------------------------------------
def test_stop_split_across_chunks_is_never_returned():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)  # "ST" may start STOP: held
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)


def test_held_text_is_released_when_it_stops_matching():
    m = StopMatcher(["STOP"])
    assert m.feed("xS") == ("x", False)
    assert m.feed("Ty") == ("STy", False)
    assert m.flush() == ""


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["b", "cd"])
    assert m.feed("acdb") == ("a", True)


def test_flush_returns_partial_tail():
    m = StopMatcher(["\n\n"])
    assert m.feed("end\n") == ("end", False)
    assert m.flush() == "\n"


# -- sampling -----------------------------------------------------------------------------------------
def test_top_p_filter_keeps_the_nucleus_per_row():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    out = top_p_filter(probs, torch.tensor([0.8, 1.0]))
    assert out[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert out[1].tolist() == pytest.approx([0.25] * 4)
    assert top_p_filter(probs[:1], torch.tensor([0.1]))[0].tolist() == pytest.approx([0.5, 0, 0, 0])


def test_greedy_rows_and_seeded_rows_in_one_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(8, temperature=0.0), SamplingParams(8, 1.0, seed=7), SamplingParams(8, 1.0, seed=7)]
    first = sample(logits, params, [make_generator(p) for p in params])
    again = sample(logits, params, [make_generator(p) for p in params])
    assert first[0] == logits[0].argmax()
    assert first.tolist() == again.tolist()  # same seed, same token, whatever the neighbours
    assert make_generator(params[0]) is None


def test_each_sampling_rows_settings_stay_its_own():
    """Every row samples (the batch's settings and uniforms go to the device packed together): each row
    draws what it draws alone, by its own temperature, top_p, min_p and seed."""
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(8, 1.0, seed=1),
        SamplingParams(8, 0.7, top_p=1e-6, seed=2),  # the top token only
        SamplingParams(8, 2.0, min_p=1.0, seed=3),  # the top token only
        SamplingParams(8, 1.5, top_p=0.9, min_p=0.05, seed=4),
    ]
    together = sample(logits, params, [make_generator(p) for p in params]).tolist()
    alone = [sample(logits[i : i + 1], [p], [make_generator(p)]).item() for i, p in enumerate(params)]
    assert together == alone
    assert together[1:3] == logits[1:3].argmax(-1).tolist()
    assert len({sample(logits[:1], params[:1], [make_generator(SamplingParams(8, 1.0))]).item() for _ in range(20)}) > 1


def test_min_p_keeps_tokens_near_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert min_p_filter(probs, torch.tensor([0.5]))[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert min_p_filter(probs, torch.tensor([0.0]))[0].tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05])


def test_penalties_bias_and_min_tokens_exact_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]] * 4)
    rows = [
        SamplingParams(8, frequency_penalty=0.5, presence_penalty=1.0),
        SamplingParams(8, repetition_penalty=2.0),
        SamplingParams(8, logit_bias=((3, -100.0), (1, 5.0))),
        SamplingParams(8, min_tokens=2, stop_token_ids=(0, 3)),
    ]
    states = [RowState.create(p, [1], 4, "cpu") for p in rows]
    for token in (0, 0, 2):
        states[0].record(token)
    states[1].record(0)
    out = apply_penalties(logits.clone(), states)
    # row 0: token 0 seen twice: 2 - 2*0.5 - 1; token 2 once: 0.5 - 0.5 - 1
    assert out[0].tolist() == pytest.approx([0.0, -1.0, -1.0, 3.0])
    # row 1: token 0 generated (2 / 2), token 1 in the prompt (-1 * 2)
    assert out[1].tolist() == pytest.approx([1.0, -2.0, 0.5, 3.0])
    assert out[2].tolist() == pytest.approx([2.0, 4.0, 0.5, -97.0])
    assert out[3].tolist() == [float("-inf"), -1.0, 0.5, float("-inf")]
    states[3].generated = 2  # min_tokens reached: the stop ids are allowed again
    assert apply_penalties(logits.clone(), states)[3].tolist() == [2.0, -1.0, 0.5, 3.0]


def test_next_tokens_logprobs_are_the_raw_models():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    params = [
        SamplingParams(4, temperature=0.0, logprobs=2),
        SamplingParams(4, temperature=0.0, logit_bias=((2, -100.0),)),
    ]
    states = [RowState.create(p, [0], 3, "cpu") for p in params]
    tokens, logprobs = next_tokens(logits, states)
    assert tokens == [2, 0]  # row 1: the bias moved the choice; ties go to the first index
    expected = torch.log_softmax(logits[0], -1).tolist()
    assert logprobs[0].logprob == pytest.approx(expected[2])
    assert [t for t, _ in logprobs[0].top] == [2, 1]
    assert [lp for _, lp in logprobs[0].top] == pytest.approx([expected[2], expected[1]])
    assert logprobs[1] is None
    assert [s.generated for s in states] == [1, 1]
    assert logits.tolist() == [[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]]  # the caller's logits are untouched


# -- chunks and bodies against the official schema ----------------------------------------------------
def test_chunks_follow_the_openai_rules_and_schema():
    w = streaming.ChatFormat("m", include_usage=True)
    frames = [*w.start(), *w.delta(0, "olá"), *w.finish(0, "length"), w.usage(3, 1)]
    bodies = [json.loads(f.removeprefix("data: ")) for f in frames]
    for body in bodies:
        validate(body, "CreateChatCompletionStreamResponse")
        assert (body["id"], body["created"]) == (w.id, w.created)
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "role" not in bodies[1]["choices"][0]["delta"]
    assert [b["choices"][0]["finish_reason"] for b in bodies[:3]] == [None, None, "length"]
    assert [b["usage"] for b in bodies[:3]] == [None, None, None]
    assert bodies[3]["choices"] == [] and bodies[3]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert "usage" not in json.loads(streaming.ChatFormat("m").delta(0, "x")[0].removeprefix("data: "))
    assert streaming.ChatFormat("m").delta(0, "") == []  # nothing to say: no chunk


def test_a_content_chunk_written_from_its_text_alone_is_the_generic_one():
    """Every token's frame is written from the stream's encoded ends and the text: byte for byte what the
    whole chunk's JSON gives, for texts with quotes, escapes, line separators JSON leaves raw, emoji and
    control characters, with and without usage, for a model name that needs escaping too."""
    texts = ["olá", ' "x"\\n', "a\u2028b\u2029c\x85", "🙂\x00\x1f\t", "</s>", ""]
    for model, usage in (("m", False), ('phi "3.5"\u2028', True)):
        fmt = streaming.ChatFormat(model, n=2, include_usage=usage)
        fmt.start()
        for index in (0, 1):
            for text in texts:
                generic = fmt._chunk(fmt._choice(index, {"content": text}))
                assert fmt._frames(index, [{"content": text}]) == [generic]
                assert json.loads(generic.removeprefix("data: "))["choices"][0]["delta"] == {"content": text}
                assert "\u2028" not in generic and generic.count("\n") == 2


RECORD = {
    "token": " oi",
    "logprob": -0.5,
    "bytes": [32, 111, 105],
    "top_logprobs": [
        {"token": " oi", "logprob": -0.5, "bytes": [32, 111, 105]},
        {"token": "x", "logprob": -1.5, "bytes": [120]},
    ],
}  # noqa: E501


def test_chat_body_with_n_choices_and_logprobs_schema():
    choices = [streaming.Choice(0), streaming.Choice(1)]
    choices[0].add({"index": 0, "text": " oi", "completion_tokens": 1, "finish_reason": "stop", "logprobs": [RECORD]})
    choices[1].add({"index": 1, "text": "ab", "completion_tokens": 2, "finish_reason": "length", "logprobs": []})
    fmt = streaming.ChatFormat("m", n=2)
    body = fmt.body(choices, 5)
    validate(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["logprobs"] == {"content": [RECORD], "refusal": None}
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert [json.loads(f[6:])["choices"][0]["index"] for f in fmt.start()] == [0, 1]
    chunk = json.loads(fmt.delta(1, " oi", logprobs=[RECORD])[0][6:])
    validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunk["choices"][0]["logprobs"]["content"] == [RECORD]


def test_legacy_completion_body_echo_and_logprobs():
    fmt = streaming.TextFormat("m", ["Olá"], n=1, echo=True, logprobs=True)
    choice = streaming.Choice(0)
    first = {"token": "Olá", "logprob": None, "bytes": list("Olá".encode()), "top_logprobs": None}
    choice.add(
        {
            "index": 0,
            "text": " oi",
            "completion_tokens": 1,
            "finish_reason": "length",
            "logprobs": [RECORD],
            "prompt_logprobs": [first],
        }
    )
    body = fmt.body([choice], 1)
    assert body["choices"][0]["text"] == "Olá oi"
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Olá", " oi"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {" oi": -0.5, "x": -1.5}],
        "text_offset": [0, 3],
    }
    # OpenAI sends null for the first echoed token, which nothing predicts; the published schema says
    # number there. Everything else must match the schema.
    body["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
    body["choices"][0]["logprobs"]["top_logprobs"][0] = {}
    validate(body, "CreateCompletionResponse")
    chunk = json.loads(fmt.delta(0, " oi", logprobs=[RECORD], prompt_logprobs=[first], first=True)[0][6:])
    assert chunk["choices"][0]["text"] == "Olá oi" and chunk["object"] == "text_completion"
    assert chunk["choices"][0]["logprobs"]["text_offset"] == [0, 3]
    later = json.loads(fmt.delta(0, "!", logprobs=[{**RECORD, "token": "!"}])[0][6:])
    assert later["choices"][0]["text"] == "!" and later["choices"][0]["logprobs"]["text_offset"] == [6]


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    from ptserve.engine.sampling import draw

    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    picks = [int(draw(probs, torch.tensor([u]))) for u in (0.0, 0.2, 0.25, 0.5, 0.999999)]
    assert picks == [1, 1, 3, 3, 3]
    gen = torch.Generator().manual_seed(0)
    many = draw(probs.expand(20000, 5), torch.rand(20000, generator=gen))
    assert set(many.tolist()) == {1, 3}
    assert abs((many == 3).float().mean().item() - 0.75) < 0.02


def test_streamed_lines_stay_one_line_for_python_line_readers():
    """U+2028, U+2029 and U+0085 are valid raw in JSON, but str.splitlines() (httpx's aiter_lines, and so
    many hand-written SSE/NDJSON clients) breaks lines at them: a token holding one cut a frame in two and
    its JSON no longer parsed. Every streamed line escapes them."""
    from ptserve.dialects import anthropic, ollama, responses

    text = "a\u2028b\x85c\u2029d é"
    frames = {
        "chat": (streaming.sse({"t": text}), 1),
        "anthropic": (anthropic._sse("content_block_delta", {"t": text}), 2),
        "responses": (responses._sse({"type": "response.output_text.delta", "t": text}), 2),
        "ollama": (ollama._line({"t": text}), 1),
    }
    for name, (frame, lines) in frames.items():
        parts = frame.splitlines()
        assert len([p for p in parts if p]) == lines, name
        data = [p for p in parts if p][-1].removeprefix("data: ")
        assert json.loads(data)["t"] == text, name
        assert "é" in data  # other text is kept as UTF-8, not escaped


def test_the_first_request_sees_the_workers_state():
    """The HTTP process reads the workers' state when its first request starts the link, before answering
    it: the link's thread looks later, and a first request right after start-up (no /health call before it)
    was refused as "still loading"."""
    import time

    from ptserve.link import WorkerLink

    class Status(dict):  # LitServe's setup status: a manager's dict, read over a socket
        def values(self):
            time.sleep(0.05)
            return super().values()

    link = WorkerLink(Status({"worker-0": "ready"}), None)
    assert (link.any_ready, link.state) == (False, WorkerLink.LOADING)
    link.start()
    assert (link.any_ready, link.state) == (True, WorkerLink.READY)
