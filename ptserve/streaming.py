"""Response bodies: SSE chunks for `stream: true`, one object otherwise, for chat and legacy completions.

Streaming rules (OpenAI's): one `id` and one `created` for every chunk; a chat stream's first chunk
for each choice carries `delta.role = "assistant"`; exactly one chunk per choice carries
`finish_reason`; with `stream_options.include_usage` every chunk has `"usage": null` and one last
chunk brings `choices: []` and the usage of all choices; the stream ends with `data: [DONE]`.

Log-probability records arrive from the worker in the chat shape ({token, logprob, bytes,
top_logprobs}); the legacy shape (tokens, token_logprobs, top_logprobs, text_offset) is derived here.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ptserve.structured import ToolCallParser

DONE = "data: [DONE]\n\n"


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache provided."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def cached_tokens(choices) -> int:
    return sum(c.cached_tokens for c in choices)


# Characters JSON may carry raw that Python's str.splitlines() breaks lines at (as httpx's aiter_lines does,
# which many hand-written SSE and NDJSON clients read with); JSON's own escapes are as valid and keep a line
# one line for every reader. The others (\x0b, \x1c...) are control characters: json.dumps escapes them.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line_json(payload: Any) -> str:
    """Compact JSON, UTF-8 text kept as it is, that every line reader sees as one line."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {one_line_json(payload)}\n\n"


@dataclass
class Choice:
    """One choice as it accumulates from the worker's messages."""

    index: int
    pieces: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens of its prompt the prefix cache provided (first choice of a prompt)
    stop_string: str | None = None  # the stop string that ended it, if one did

    def add(self, msg: dict[str, Any]) -> None:
        self.stop_string = msg.get("stop_string", self.stop_string)
        self.pieces.append(msg["text"])
        if "logprobs" in msg:
            self.logprobs = (self.logprobs or []) + msg["logprobs"]
        if "prompt_logprobs" in msg:
            self.prompt_logprobs = msg["prompt_logprobs"]
        self.completion_tokens = msg["completion_tokens"]
        self.cached_tokens = msg.get("cached_tokens", self.cached_tokens)
        self.finish_reason = msg["finish_reason"]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def legacy_logprobs(records: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Chat-shaped records -> the legacy completions shape. The first echoed prompt token, which nothing
    predicts, has a null logprob and null top_logprobs, as OpenAI returns it."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for rec in records:
        token = rec["token"]
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if rec["logprob"] is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(rec["logprob"])
        top = {t["token"]: t["logprob"] for t in rec["top_logprobs"]}
        top.setdefault(rec["token"], rec["logprob"])  # the sampled token is always there (up to logprobs + 1)
        out["top_logprobs"].append(top)
    return out


def join_legacy(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] + b[k] for k in a}


class OpenAIWire:
    """How an OpenAI format ends a stream and carries errors (other dialects bring their own)."""

    def error_frame(self, error: dict[str, Any]) -> str:
        return sse(error)

    def done(self) -> list[str]:
        return [DONE]

    def error_body(self, error: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
        return error, status


@dataclass
class ChatFormat(OpenAIWire):
    """chat.completion and chat.completion.chunk. With tools (`tool_mode` other than "none") the text of
    each choice goes through a ToolCallParser: tool calls come out as `tool_calls` deltas and bodies, and
    the role is sent with a choice's first delta, once it is known whether that is content or a call."""

    model: str
    n: int = 1
    include_usage: bool = False
    tool_mode: str = "none"
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    _parsers: dict[int, ToolCallParser] = field(default_factory=dict)
    _started: set[int] = field(default_factory=set)
    _ends: tuple[str, str] | None = None  # what every chunk of this stream has around its choices

    def _content_chunk(self, index: int, text: str) -> str:
        """`_chunk(_choice(index, {"content": text}))`, the frame of almost every token, from the text alone:
        the rest of the chunk is the stream's, encoded once (each frame's JSON was a large share of the HTTP
        process's time a token)."""
        if self._ends is None:
            fields = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
            head = ",".join(f"{one_line_json(k)}:{one_line_json(v)}" for k, v in fields.items())
            tail = ',"usage":null' if self.include_usage else ""
            self._ends = ("data: {" + head + ',"choices":[', "]" + tail + "}\n\n")
        start, end = self._ends
        delta = f'{{"index":{index},"delta":{{"content":{one_line_json(text)}}},"logprobs":null,"finish_reason":null}}'
        return start + delta + end

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return sse(body)

    def _choice(self, index: int, delta: dict[str, Any], finish=None, logprobs=None) -> list[dict[str, Any]]:
        lp = {"content": logprobs, "refusal": None} if logprobs is not None else None
        return [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]

    def _parser(self, index: int) -> ToolCallParser:
        return self._parsers.setdefault(index, ToolCallParser(self.tool_mode))

    def start(self) -> list[str]:
        if self.tool_mode != "none":
            return []  # the role goes with each choice's first delta
        self._started.update(range(self.n))
        return [self._chunk(self._choice(i, {"role": "assistant", "content": ""})) for i in range(self.n)]

    def delta(self, index: int, text: str, logprobs: list[dict[str, Any]] | None = None, **_: Any) -> list[str]:
        if self.tool_mode == "none":
            deltas = [{"content": text}] if text else []
        else:
            deltas = [_event_delta(e) for e in self._parser(index).feed(text)]
        if logprobs and not deltas:
            deltas = [{"content": ""}]
        return self._frames(index, deltas, logprobs)

    def _frames(self, index: int, deltas: list[dict[str, Any]], logprobs=None) -> list[str]:
        frames = []
        for k, delta in enumerate(deltas):
            if index not in self._started:
                self._started.add(index)
                delta = {"role": "assistant", **({"content": None} if "tool_calls" in delta else {}), **delta}
            lp = logprobs if k == 0 else None
            if lp is None and len(delta) == 1 and isinstance(delta.get("content"), str):
                frames.append(self._content_chunk(index, delta["content"]))
            else:
                frames.append(self._chunk(self._choice(index, delta, logprobs=lp)))
        return frames

    def finish(self, index: int, reason: str, **_: Any) -> list[str]:
        frames: list[str] = []
        if self.tool_mode != "none":
            parser = self._parser(index)
            frames += self._frames(index, [_event_delta(e) for e in parser.finish()])
            if parser.calls and reason == "stop":
                reason = "tool_calls"
        if index not in self._started:
            frames += self._frames(index, [{"content": ""}])
        return [*frames, self._chunk(self._choice(index, {}, reason))]

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> str:
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens, cached))

    def _message(self, c: Choice) -> tuple[dict[str, Any], str | None]:
        if self.tool_mode == "none":
            return {"role": "assistant", "content": c.text, "refusal": None}, c.finish_reason
        parsed = ToolCallParser.parse(self.tool_mode, c.text)
        if not parsed.calls:  # text, or a call cut off (max_tokens) before its name was complete
            content = parsed.content or "" if parsed.is_text else None
            return {"role": "assistant", "content": content, "refusal": None}, c.finish_reason
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": parsed.calls}
        return message, "tool_calls" if c.finish_reason == "stop" else c.finish_reason

    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        out = []
        for c in choices:
            message, finish = self._message(c)
            out.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": {"content": c.logprobs, "refusal": None} if c.logprobs is not None else None,
                    "finish_reason": finish,
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": out,
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices), cached_tokens(choices)),
        }


class ChatChunks(ChatFormat):
    """Chat chunks as dicts, for the dialects that translate them (Anthropic's, Responses): the tool-call
    parsing and OpenAI's delta rules stay in one place."""

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:  # type: ignore[override]
        return {"choices": choices, **extra}

    def _content_chunk(self, index: int, text: str) -> dict[str, Any]:  # type: ignore[override]
        return self._chunk(self._choice(index, {"content": text}))


def _event_delta(event: tuple) -> dict[str, Any]:
    """A ToolCallParser event -> a chat delta. `id`, `type` and `name` only on a call's first delta."""
    if event[0] == "content":
        return {"content": event[1]}
    if event[0] == "call":
        _, index, cid, name = event
        return {
            "tool_calls": [{"index": index, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}]
        }
    _, index, fragment = event
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


@dataclass
class TextFormat(OpenAIWire):
    """text_completion (legacy /v1/completions); chunks have the same shape as the body.

    `prompts[i]` is the text of choice i's prompt: with `echo` it comes before the completion, and its
    tokens' log-probabilities before the completion's."""

    model: str
    prompts: list[str]
    n: int = 1
    include_usage: bool = False
    echo: bool = False
    logprobs: bool = False
    id: str = field(default_factory=lambda: completion_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))
    _offsets: dict[int, int] = field(default_factory=dict)

    def _prompt_of(self, index: int) -> str:
        return self.prompts[index // self.n]

    def _body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        body["choices"] = choices
        body.update(extra)
        return body

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        if self.include_usage:
            extra.setdefault("usage", None)
        return sse(self._body(choices, **extra))

    def start(self) -> list[str]:
        return []  # with echo the prompt goes out with the first delta, which brings its logprobs

    def delta(self, index: int, text: str, logprobs=None, prompt_logprobs=None, first=False) -> list[str]:
        """`first`: the choice's first delta, which brings the echoed prompt (and its logprobs)."""
        echo = self._prompt_of(index) if self.echo and first else ""
        offset = self._offsets.get(index, 0) + len(echo)
        self._offsets[index] = offset + len(text)
        lp = self._logprobs(logprobs, prompt_logprobs if echo else None, offset)
        if not echo + text and not (lp and lp["tokens"]):
            return []
        return [self._chunk([{"text": echo + text, "index": index, "logprobs": lp, "finish_reason": None}])]

    def _logprobs(self, records, prompt_records, offset: int) -> dict[str, Any] | None:
        """The legacy logprobs of a completion piece starting at `offset`, after the echoed prompt's when
        `prompt_records` is given; None when the request asked for none."""
        if not self.logprobs:
            return None
        lp = legacy_logprobs(records or [], offset)
        return lp if prompt_records is None else join_legacy(legacy_logprobs(prompt_records, 0), lp)

    def finish(self, index: int, reason: str, **_: Any) -> list[str]:
        return [self._chunk([{"text": "", "index": index, "logprobs": None, "finish_reason": reason}])]

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> str:
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens, cached))

    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        out = []
        for c in choices:
            prompt = self._prompt_of(c.index) if self.echo else ""
            lp = self._logprobs(c.logprobs, c.prompt_logprobs if self.echo else None, len(prompt))
            out.append({"text": prompt + c.text, "index": c.index, "logprobs": lp, "finish_reason": c.finish_reason})
        completion = sum(c.completion_tokens for c in choices)
        return self._body(out, usage=usage(prompt_tokens, completion, cached_tokens(choices)))
