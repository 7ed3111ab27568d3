"""Anthropic's Messages API: `POST /v1/messages` (plain and streamed) and `/v1/messages/count_tokens`, for
agents built on Anthropic's SDK.

A request becomes the one internal request, an OpenAI chat body (`to_chat`): `system` (a string or text
blocks) becomes the system message; user `tool_result` blocks become tool messages, assistant `tool_use`
blocks tool calls; `tools` (`input_schema`) become functions, `tool_choice` auto / any / tool / none
becomes auto / required / named / none (`disable_parallel_tool_use`: one call at most);
`output_config.format` (a JSON schema) becomes a json_schema response format; `stop_sequences`,
`temperature`, `top_p`, `top_k` (which older clients send; today's SDK passes them in `extra_body`) and
`max_tokens` carry over. `metadata`, `thinking`, `output_config.effort`, `service_tier` and the other
fields the SDK may send are accepted and ignored: none can change what this model writes. Images and
documents get a 400 (a text-only model).

The engine's output comes back in Anthropic's shapes: a `message` with `text` and `tool_use` blocks,
`stop_reason` end_turn / max_tokens / stop_sequence / tool_use and `usage`; streamed as message_start,
ping, content_block_start / _delta (text_delta, input_json_delta) / _stop, message_delta (stop reason
and output tokens) and message_stop events; errors as {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from ptserve.errors import invalid_request
from ptserve.streaming import ChatChunks, Choice, one_line_json

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4  # the engine's limit for stop strings (OpenAI's too)
# Anthropic's error types by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
TOOL_ID_PREFIX = "toolu_"  # Anthropic's prefix for tool-use ids; ours are OpenAI's call_...
# Accepted and ignored: none can change what this model writes (or it has nothing to do with them).
IGNORED = (
    "metadata",
    "thinking",
    "service_tier",
    "container",
    "context_management",
    "mcp_servers",
    "cache_control",
    "diagnostics",
    "inference_geo",
    "speed",
    "user_profile_id",
    "workspace_id",
)


# -- errors ---------------------------------------------------------------------------------------------
def error_payload(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(status: int, openai_envelope: dict[str, Any], headers: dict[str, str] | None = None):
    """An error the rest of the server describes in OpenAI's envelope, in Anthropic's shape."""
    return JSONResponse(error_payload(status, openai_envelope["error"]["message"]), status_code=status, headers=headers)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {one_line_json(data)}\n\n"


# -- request ----------------------------------------------------------------------------------------------
def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid_request(f"Invalid '{where}': expected a string or a list of content blocks.", param=where)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid_request(f"Invalid '{where}.{j}': a content block needs a 'type'.", param=f"{where}.{j}")
    return content


def _text_of(blocks: list[dict[str, Any]], where: str) -> str:
    texts = []
    for j, block in enumerate(blocks):
        if block["type"] != "text":
            raise invalid_request(
                f"Invalid '{where}.{j}.type': only text blocks may appear here, got {block['type']!r}.",
                param=f"{where}.{j}.type",
            )
        texts.append(str(block.get("text", "")))
    return "\n".join(texts)


def _tool_id(value: Any) -> Any:
    return value[len(TOOL_ID_PREFIX) :] if isinstance(value, str) and value.startswith(TOOL_ID_PREFIX) else value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("Invalid 'messages': expected a non-empty list of messages.", param="messages")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of(_blocks(system, "system"), "system")})
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise invalid_request(f"Invalid '{where}.role': expected 'user' or 'assistant'.", param=f"{where}.role")
        blocks = _blocks(m.get("content"), f"{where}.content")
        texts, calls = [], []
        for j, block in enumerate(blocks):
            kind, at = block["type"], f"{where}.content.{j}"
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_result" and m["role"] == "user":
                result = block.get("content", "")
                text = result if isinstance(result, str) else _text_of(_blocks(result, f"{at}.content"), at)
                if block.get("is_error"):
                    text = f"Error: {text}"
                out.append({"role": "tool", "tool_call_id": _tool_id(block.get("tool_use_id")), "content": text})
            elif kind == "tool_use" and m["role"] == "assistant":
                arguments = json.dumps(block.get("input") or {}, ensure_ascii=False, separators=(",", ":"))
                call = {"name": block.get("name"), "arguments": arguments}
                calls.append({"id": _tool_id(block.get("id")), "type": "function", "function": call})
            elif kind in ("thinking", "redacted_thinking"):
                continue  # an earlier turn's reasoning: nothing this model can read
            elif kind in ("image", "document"):
                raise invalid_request(
                    f"Invalid '{at}.type': this model reads text only; {kind} blocks cannot be used.",
                    param=f"{at}.type",
                )
            else:
                raise invalid_request(
                    f"Invalid '{at}.type': {kind!r} blocks are not supported in {m['role']} messages.",
                    param=f"{at}.type",
                )
        if m["role"] == "user" and texts:
            out.append({"role": "user", "content": "\n".join(texts)})
        elif m["role"] == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    return out


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    tools = body.get("tools")
    if not tools:
        return {}
    if not isinstance(tools, list):
        raise invalid_request("Invalid 'tools': expected a list of tools.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise invalid_request(
                f"Invalid 'tools.{i}': only client tools (name, description, input_schema) can be used; got {kind!r}.",
                param=f"tools.{i}.type",
            )
        function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    fields: dict[str, Any] = {"tools": out}
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise invalid_request(
                "Invalid 'tool_choice.type': expected 'auto', 'any', 'tool' or 'none'.", param="tool_choice.type"
            )
        fields["tool_choice"] = {
            "auto": "auto",
            "any": "required",
            "none": "none",
            "tool": {"type": "function", "function": {"name": choice.get("name")}},
        }[kind]
        if choice.get("disable_parallel_tool_use"):
            fields["parallel_tool_calls"] = False
    return fields


def _format(body: dict[str, Any]) -> dict[str, Any]:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise invalid_request(
            'Invalid \'output_config.format\': expected {"type": "json_schema", "schema": {...}}.',
            param="output_config.format",
        )
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}}


def to_chat(body: Any, count_only: bool = False) -> dict[str, Any]:
    """An Anthropic request -> the OpenAI chat body the rest of the server serves (validated there)."""
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {type(body).__name__}.")
    if not isinstance(body.get("model"), str):
        raise invalid_request("Missing required parameter: 'model'.", param="model")
    chat: dict[str, Any] = {"model": body["model"], "messages": _messages(body), **_tools(body), **_format(body)}
    ignored = [k for k in IGNORED if k in body]
    if ignored:
        logger.info("ignoring Messages API fields this model cannot use: %s", ", ".join(ignored))
    if count_only:
        return chat
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid_request(
            f"Invalid 'max_tokens': a positive integer is required (got {max_tokens!r}).", param="max_tokens"
        )
    chat["max_tokens"] = max_tokens
    stops = body.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES:
            raise invalid_request(
                f"Invalid 'stop_sequences': this server takes at most {MAX_STOP_SEQUENCES} stop sequences, "
                f"got {len(stops) if isinstance(stops, list) else stops!r}.",
                param="stop_sequences",
            )
        chat["stop"] = stops
    temperature = body.get("temperature")
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0 <= temperature <= 1):
        raise invalid_request(
            f"Invalid 'temperature': it must be between 0 and 1, got {temperature!r}.", param="temperature"
        )
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            chat[key] = float(body[key]) if key == "temperature" else body[key]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # the output tokens of message_delta
    return chat


# -- response ---------------------------------------------------------------------------------------------
def _stop_reason(finish: str | None, stop_string: str | None) -> tuple[str | None, str | None]:
    if finish == "stop" and stop_string is not None:
        return "stop_sequence", stop_string
    return STOP_REASONS.get(finish, "end_turn"), None


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError:  # cut off by max_tokens: what was written, as a string
        arguments = {"_partial": call["function"]["arguments"]}
    return {"type": "tool_use", "id": TOOL_ID_PREFIX + call["id"], "name": call["function"]["name"], "input": arguments}


@dataclass
class MessagesFormat:
    """The engine's output in the Messages API's shapes; what `exchange.Exchange` drives."""

    model: str
    prompt_tokens: int
    tool_mode: str = "none"
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")
    include_usage: bool = True  # message_delta carries the output tokens
    _block: int = -1  # the open content block's index (-1: none)
    _kind: str | None = None  # "text" or "tool_use"
    _finish: tuple[str | None, str | None] = ("end_turn", None)

    def __post_init__(self):
        self._chat = ChatChunks(self.model, 1, include_usage=True, tool_mode=self.tool_mode)

    # streamed
    def start(self) -> list[str]:
        self._chat.start()  # the role chunk: nothing to say in this dialect
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }
        return [_sse("message_start", {"type": "message_start", "message": message}), _sse("ping", {"type": "ping"})]

    def delta(self, index: int, text: str, **_: Any) -> list[str]:
        return self._events(self._chat.delta(index, text))

    def finish(self, index: int, reason: str, stop_string: str | None = None, **_: Any) -> list[str]:
        chunks = self._chat.finish(index, reason)
        events = self._events(chunks)
        finish = next((c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]), reason)
        self._finish = _stop_reason(finish, stop_string)
        return events + self._close()

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> str:
        stop_reason, stop_sequence = self._finish
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {"output_tokens": completion_tokens},
        }
        return _sse("message_delta", delta) + _sse("message_stop", {"type": "message_stop"})

    def done(self) -> list[str]:
        return []

    def error_frame(self, error: dict[str, Any]) -> str:
        return _sse("error", error_payload(500, error["error"]["message"]))

    def error_body(self, error: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
        return error_payload(status, error["error"]["message"]), status

    def _open(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self._close()
        self._block += 1
        self._kind = kind
        start = {"type": "content_block_start", "index": self._block, "content_block": block}
        return [*events, _sse("content_block_start", start)]

    def _close(self) -> list[str]:
        if self._kind is None:
            return []
        self._kind = None
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self._block})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": self._block, "delta": delta})

    def _events(self, chunks: list[dict[str, Any]]) -> list[str]:
        events: list[str] = []
        for chunk in chunks:
            delta = chunk["choices"][0]["delta"]
            if delta.get("content"):
                if self._kind != "text":
                    events += self._open("text", {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or []:
                if "id" in call:  # a call's first delta names it
                    block = {"type": "tool_use", "id": TOOL_ID_PREFIX + call["id"], "name": call["function"]["name"]}
                    events += self._open("tool_use", {**block, "input": {}})
                arguments = call.get("function", {}).get("arguments")
                if arguments:
                    events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    # one body
    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        chat = self._chat.body(choices, prompt_tokens)
        [choice] = chat["choices"]
        message = choice["message"]
        content: list[dict[str, Any]] = []
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        content += [_tool_use(call) for call in message.get("tool_calls") or []]
        stop_reason, stop_sequence = _stop_reason(choice["finish_reason"], choices[0].stop_string)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": choices[0].completion_tokens},
        }


def count_tokens_body(prompt_ids: list[int]) -> dict[str, Any]:
    return {"input_tokens": len(prompt_ids)}
