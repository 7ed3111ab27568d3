"""OpenAI's Responses API, stateless: `POST /v1/responses` (plain and streamed), what Codex CLI, the
openai-agents SDK and LangChain's `use_responses_api` speak.

A request becomes the one internal request, an OpenAI chat body (`to_chat`): `instructions` becomes the
system message; `input` (a string, or items: messages with text parts, `function_call`,
`function_call_output`) becomes the conversation; function `tools`, `tool_choice` and
`parallel_tool_calls` carry over, `text.format` (json_schema / json_object) becomes the response format,
`max_output_tokens`, `temperature`, `top_p`, `user` carry over. Nothing is stored: a
`previous_response_id` (or `conversation`, `background`) gets a 400 that says to send the whole
conversation; `store`, `reasoning`, `include`, `service_tier`, `truncation`, `prompt_cache_key`,
`safety_identifier`, `metadata` (echoed back) and the like are accepted and ignored.

The output comes back as a `response` object with `message` and `function_call` items and usage; streamed
as the official events, each with its `sequence_number`: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta / .done,
response.function_call_arguments.delta / .done, response.content_part.done, response.output_item.done,
then response.completed (or response.incomplete when max_output_tokens cut it).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ptserve.errors import invalid_request
from ptserve.streaming import ChatChunks, Choice, one_line_json

logger = logging.getLogger(__name__)

# Accepted and ignored: nothing here can change what this model writes (metadata is echoed back).
IGNORED = (
    "store",
    "reasoning",
    "include",
    "service_tier",
    "truncation",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "max_tool_calls",
    "stream_options",
    "top_logprobs",
)
UNSTATEFUL = ("previous_response_id", "conversation", "background", "prompt")
TEXT_PARTS = ("input_text", "output_text", "text")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# -- request ----------------------------------------------------------------------------------------------
def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"Invalid '{where}': expected a string or a list of content parts.", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise invalid_request(
                f"Invalid '{where}[{j}].type': this model reads text only; got {kind!r} (use input_text).",
                param=f"{where}[{j}].type",
            )
    return "\n".join(texts)


def _input(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": _text(body["instructions"], "instructions")})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise invalid_request("Invalid 'input': expected a string or a non-empty list of items.", param="input")
    for i, item in enumerate(given):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid_request(f"Invalid '{where}': expected an object.", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid_request(
                    f"Invalid '{where}.role': expected user, assistant, system or developer; got {role!r}.",
                    param=f"{where}.role",
                )
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": item.get("arguments", "")}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: nothing this model can read
        else:
            raise invalid_request(
                f"Invalid '{where}.type': {kind!r} items are not supported (use message, function_call, "
                "function_call_output).",
                param=f"{where}.type",
            )
    return messages


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    tools = body.get("tools") or []
    if tools:
        out = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
                raise invalid_request(
                    f"Invalid 'tools[{i}].type': only function tools can be used with this model; got {kind!r}.",
                    param=f"tools[{i}].type",
                )
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
            out.append({"type": "function", "function": function})
        fields["tools"] = out
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise invalid_request(
                f"Invalid 'tool_choice': expected 'auto', 'none', 'required' or a function; got {choice!r}.",
                param="tool_choice",
            )
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        fields["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        fields["parallel_tool_calls"] = body["parallel_tool_calls"]
    return fields


def _format(body: dict[str, Any]) -> dict[str, Any]:
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise invalid_request(
        "Invalid 'text.format': expected a type of text, json_object or json_schema.", param="text.format"
    )


def to_chat(body: Any) -> dict[str, Any]:
    """A Responses request -> the OpenAI chat body the rest of the server serves (validated there)."""
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {type(body).__name__}.")
    for key in UNSTATEFUL:
        if body.get(key):
            raise invalid_request(
                f"'{key}' is not supported: this server stores no responses or conversations. Send the whole "
                "conversation in 'input' (earlier outputs included) instead.",
                param=key,
            )
    if not isinstance(body.get("model"), str):
        raise invalid_request("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    chat: dict[str, Any] = {"model": body["model"], "messages": _input(body), **_tools(body), **_format(body)}
    for key in ("temperature", "top_p", "user"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    ignored = [k for k in IGNORED if k in body]
    if ignored:
        logger.info("ignoring Responses API fields this server does not honour: %s", ", ".join(ignored))
    return chat


# -- response ---------------------------------------------------------------------------------------------
def _sse(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {one_line_json(data)}\n\n"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponsesFormat:
    """The engine's output as a Responses `response` and its stream events; what `exchange.Exchange` drives."""

    model: str
    prompt_tokens: int
    request: dict[str, Any]  # the original body: the response echoes its settings
    tool_mode: str = "none"
    id: str = field(default_factory=lambda: _new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = True  # response.completed carries the usage
    _seq: int = 0
    _items: list[dict[str, Any]] = field(default_factory=list)  # output items, the last one maybe open
    _open: bool = False
    _finish: str | None = None

    def __post_init__(self):
        self._chat = ChatChunks(self.model, 1, include_usage=True, tool_mode=self.tool_mode)

    # the response object
    def _response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.request
        choice = req.get("tool_choice", "auto")
        fmt = (req.get("text") or {}).get("format") or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "model": self.model,
            "output": list(self._items),
            "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": req.get("temperature", 1.0),
            "text": {"format": fmt},
            "tool_choice": choice,
            "tools": req.get("tools") or [],
            "top_p": req.get("top_p", 1.0),
            "truncation": "disabled",
            "metadata": req.get("metadata") or {},
            **({"usage": usage} if usage is not None else {}),
            **({"user": req["user"]} if req.get("user") else {}),
        }

    def _status(self) -> str:
        return "incomplete" if self._finish == "length" else "completed"

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
        return {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # streamed
    def _event(self, kind: str, **data: Any) -> str:
        self._seq += 1
        return _sse({"type": kind, "sequence_number": self._seq - 1, **data})

    def start(self) -> list[str]:
        self._chat.start()  # the role chunk: nothing to say in this dialect
        response = self._response("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def delta(self, index: int, text: str, **_: Any) -> list[str]:
        return self._events(self._chat.delta(index, text))

    def finish(self, index: int, reason: str, **_: Any) -> list[str]:
        chunks = self._chat.finish(index, reason)
        events = self._events(chunks)
        self._finish = next(
            (c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]), reason
        )
        return events + self._close()

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> str:
        status = self._status()
        response = self._response(status, self._usage(prompt_tokens, completion_tokens, cached))
        return self._event(f"response.{status}", response=response)

    def done(self) -> list[str]:
        return []

    def error_frame(self, error: dict[str, Any]) -> str:
        inner = error["error"]
        return self._event("error", code=inner.get("code"), message=inner["message"], param=inner.get("param"))

    def error_body(self, error: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
        return error, status  # the Responses API answers errors in the usual OpenAI envelope

    def _begin(self, item: dict[str, Any]) -> list[str]:
        events = self._close()
        self._items.append(item)
        self._open = True
        added = {**item, "content": []} if item["type"] == "message" else dict(item)
        events.append(self._event("response.output_item.added", output_index=len(self._items) - 1, item=added))
        if item["type"] == "message":
            part = _text_part("")
            events.append(self._event("response.content_part.added", **self._where(), part=part))
            item["content"] = [part]
        return events

    def _where(self, content: bool = True) -> dict[str, Any]:
        where = {"item_id": self._items[-1]["id"], "output_index": len(self._items) - 1}
        return {**where, "content_index": 0} if content else where

    def _close(self) -> list[str]:
        if not self._open:
            return []
        self._open = False
        item = self._items[-1]
        status = "incomplete" if self._finish == "length" else "completed"
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self._event("response.output_text.done", **self._where(), text=part["text"], logprobs=[]))
            events.append(self._event("response.content_part.done", **self._where(), part=dict(part)))
        else:
            done = {"arguments": item["arguments"], "name": item["name"]}
            events.append(self._event("response.function_call_arguments.done", **self._where(False), **done))
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=len(self._items) - 1, item=item))
        return events

    def _events(self, chunks: list[dict[str, Any]]) -> list[str]:
        events: list[str] = []
        for chunk in chunks:
            delta = chunk["choices"][0]["delta"]
            if delta.get("content"):
                if not (self._open and self._items[-1]["type"] == "message"):
                    events += self._begin(_message_item(_new_id("msg"), "", "in_progress"))
                self._items[-1]["content"][0]["text"] += delta["content"]
                events.append(
                    self._event("response.output_text.delta", **self._where(), delta=delta["content"], logprobs=[])
                )
            for call in delta.get("tool_calls") or []:
                if "id" in call:  # a call's first delta names it
                    events += self._begin(_call_item(call["id"], call["function"]["name"], "", "in_progress"))
                arguments = call.get("function", {}).get("arguments")
                if arguments:
                    self._items[-1]["arguments"] += arguments
                    events.append(
                        self._event("response.function_call_arguments.delta", **self._where(False), delta=arguments)
                    )
        return events

    # one body
    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        chat = self._chat.body(choices, prompt_tokens)
        [choice] = chat["choices"]
        message = choice["message"]
        self._finish = choice["finish_reason"]
        status = "incomplete" if self._finish == "length" else "completed"
        if message.get("content"):
            self._items.append(_message_item(_new_id("msg"), message["content"], status))
        for call in message.get("tool_calls") or []:
            self._items.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"], status))
        usage = self._usage(prompt_tokens, choices[0].completion_tokens, choices[0].cached_tokens)
        response = self._response(self._status(), usage)
        response["output_text"] = message.get("content") or ""  # the SDKs' convenience, also in the body
        return response


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [_text_part(text)]}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    item_id = "fc_" + call_id.removeprefix("call_")
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }
