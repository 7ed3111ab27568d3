"""Structured output and tool calling for a model without tool tokens (the HTTP side).

Three pieces, all plain text work:
- `tools_prompt`: the tool definitions as a system-prompt section (the documented template).
- `build_grammar`: `response_format` and `tools`/`tool_choice` -> one Lark grammar (llguidance's dialect)
  that the engine enforces token by token. JSON is compact (no free whitespace), so even a random
  model closes it soon. A tool call is written as
      <tool_call>\\n{"name":"NAME","arguments":{...}}\\n</tool_call>
  (several, one per line, when parallel calls are allowed): the same blocks `prompting` renders for
  tool calls in the history.
- `ToolCallParser`: the model's text -> content and OpenAI tool calls, whole or as stream deltas.

With tool_choice "auto" the model chooses: text that does not start with "<", or tool calls. So a
call can never come back as plain content. (The price: an "auto" answer cannot begin with "<".)
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ptserve.errors import invalid_request
from ptserve.protocol import ChatCompletionRequest, Tool

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
CALL_SEPARATOR = "\n"
COMPACT = {"x-guidance": {"whitespace_flexible": False}}  # llguidance: no whitespace between JSON tokens
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}

TOOLS_PROMPT = """You can call these tools (functions), described in JSON:
<tools>
{tools}
</tools>
{instruction}
<tool_call>
{{"name":"<function name>","arguments":<the arguments as a JSON object>}}
</tool_call>"""
INSTRUCTIONS = {
    "auto": "Answer in text, or, to call tools, answer with only one block per call:",
    "required": "You must call at least one tool: answer with only one block per call:",
    "named": "You must call the tool {name}: answer with only this block:",
}


def call_head(name: str) -> str:
    return f'{CALL_OPEN}{{"name":{json.dumps(name)},"arguments":'


def tools_prompt(request: ChatCompletionRequest) -> str | None:
    """The system-prompt section that tells the model its tools, or None when it may not call any."""
    mode = request.tool_mode()
    if mode == "none":
        return None
    lines = []
    for tool in request.tools:
        fn = tool.function
        spec: dict[str, Any] = {"name": fn.name}
        if fn.description:
            spec["description"] = fn.description
        spec["parameters"] = fn.parameters if fn.parameters is not None else NO_ARGUMENTS
        lines.append(json.dumps(spec, ensure_ascii=False, separators=(",", ":")))
    name = request.tool_choice.function.name if mode == "named" else ""
    return TOOLS_PROMPT.format(tools="\n".join(lines), instruction=INSTRUCTIONS[mode].format(name=name))


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def close_objects(schema: Any) -> Any:
    """Objects that list `properties` and say nothing of `additionalProperties` get no others: what
    OpenAI's strict mode requires and xgrammar's default does. Otherwise a model may go on adding keys
    (pydantic's schemas, which LangChain sends, never say)."""
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**close_objects(schema), **COMPACT}, ensure_ascii=False)


def _response_schema(request: ChatCompletionRequest) -> tuple[dict[str, Any], str] | None:
    """(schema, param) of response_format, or None for text."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}, "response_format"
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return schema, "response_format.json_schema.schema"


def build_grammar(request: ChatCompletionRequest) -> str | None:
    """The Lark grammar the answer must follow, or None when it is free text."""
    mode = request.tool_mode()
    response = _response_schema(request)
    if mode == "none" and response is None:
        return None
    # The first generated token of a SentencePiece model may carry a space that the text does not show.
    rules = ['start: " "? answer']
    if mode == "none":
        rules.append(f"answer: {_json_rule(response[0])}")
        return "\n".join(rules)
    tools = [t for t in request.tools if mode != "named" or t.function.name == request.tool_choice.function.name]
    parallel = request.parallel_tool_calls is not False
    calls = f"call ({_lark_string(CALL_SEPARATOR)} call)*" if parallel else "call"
    if mode == "auto":
        text = _json_rule(response[0]) if response else "TEXT?"
        rules.append(f"answer: calls | {text}")
        rules.append("TEXT: /[^< ](.|\\n)*/")
    else:
        rules.append("answer: calls")
    rules.append(f"calls: {calls}")
    rules.append("call: " + " | ".join(f"fn_{i}" for i in range(len(tools))))
    for i, tool in enumerate(tools):
        rules.append(f"fn_{i}: {_function_rule(tool)}")
    return "\n".join(rules)


def _function_rule(tool: Tool) -> str:
    fn = tool.function
    params = fn.parameters if fn.parameters is not None else NO_ARGUMENTS
    return f"{_lark_string(call_head(fn.name))} {_json_rule(params)} {_lark_string('}' + CALL_CLOSE)}"


def check_grammar(grammar: str, request: ChatCompletionRequest) -> None:
    """A schema the grammar library cannot compile is the client's error: 400 naming where it came from."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar), None)
    if not error:
        return
    param = _response_schema(request)[1] if request.tool_mode() == "none" else "tools"
    raise invalid_request(f"Invalid JSON schema in '{param}': {error.strip().splitlines()[0]}", param=param)


# -- output -> tool calls -----------------------------------------------------------------------------
def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallParser:
    """The model's text -> content and tool calls, incrementally (as `feed` gets text) or at once.

    `feed` returns events: ("content", text), ("call", index, id, name) on a call's first delta, and
    ("arguments", index, fragment). The grammar guarantees the block format, so this is a small state
    machine, not a guess."""

    mode: str  # auto | required | named
    calls: list[dict[str, Any]] = field(default_factory=list)
    content: str | None = None
    _buffer: str = ""
    _decided: bool = False  # auto: whether the answer is text or calls is known
    _is_text: bool = False
    _state: str = "head"  # head: waiting for a call's name; args: inside its arguments

    def feed(self, text: str) -> list[tuple]:
        self._buffer += text
        events: list[tuple] = []
        if not self._decided:
            if self.mode == "auto":
                stripped = self._buffer.lstrip(" ")
                if not stripped:
                    return events
                self._is_text = not stripped.startswith("<")
            self._decided = True
        if self._is_text:
            chunk, self._buffer = self._buffer, ""
            self.content = (self.content or "") + chunk
            return [("content", chunk)] if chunk else []
        while self._step(events):
            pass
        return events

    @property
    def is_text(self) -> bool:
        """The answer is text: auto mode chose it, or nothing was generated at all."""
        return self._is_text or (self.mode == "auto" and not self._decided)

    def finish(self) -> list[tuple]:
        """Flush what is held (an answer cut off by max_tokens)."""
        if self._state == "args" and self._buffer:
            fragment, self._buffer = self._buffer, ""
            self.calls[-1]["function"]["arguments"] += fragment
            return [("arguments", len(self.calls) - 1, fragment)]
        return []

    def _step(self, events: list[tuple]) -> bool:
        if self._state == "head":
            self._buffer = self._buffer.lstrip(" " + CALL_SEPARATOR)  # a leading space, the calls' separator
            end = self._buffer.find('","arguments":')
            start = self._buffer.find('{"name":"')
            if start < 0 or end < 0:
                return False
            name = json.loads(self._buffer[start + len('{"name":') : end + 1])
            self._buffer = self._buffer[end + len('","arguments":') :]
            call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
            self.calls.append(call)
            events.append(("call", len(self.calls) - 1, call["id"], name))
            self._state = "args"
            return True
        closing = "}" + CALL_CLOSE
        end = self._buffer.find(closing)  # a raw newline never occurs inside compact JSON strings
        if end >= 0:
            fragment, self._buffer = self._buffer[:end], self._buffer[end + len(closing) :]
            self._state = "head"
        else:
            keep = max(len(self._buffer) - len(closing) + 1, 0)  # the closing may be arriving
            fragment, self._buffer = self._buffer[:keep], self._buffer[keep:]
        if fragment:
            self.calls[-1]["function"]["arguments"] += fragment
            events.append(("arguments", len(self.calls) - 1, fragment))
        return self._state == "head"

    @classmethod
    def parse(cls, mode: str, text: str) -> ToolCallParser:
        parser = cls(mode)
        parser.feed(text)
        parser.finish()
        return parser
