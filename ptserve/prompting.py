"""Messages -> prompt token ids with the tokenizer's chat template; the default system prompt; the
context-window check."""

from __future__ import annotations

import json

from ptserve.errors import invalid_request
from ptserve.protocol import ChatMessage, ToolCall


def render_tool_calls(calls: list[ToolCall]) -> str:
    """An assistant's tool calls as text Phi-3.5 can read back: one `<tool_call>` block per call holding
    compact {"name", "arguments"} JSON (the Hermes/Qwen convention many models have seen), exactly as
    the tool-call grammar (`structured.build_grammar`) makes the model write them."""
    blocks = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = call.function.arguments  # kept as the string the client sent
        payload = json.dumps(
            {"name": call.function.name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":")
        )
        blocks.append(f"<tool_call>\n{payload}\n</tool_call>")
    return "\n".join(blocks)


def render_tool_result(name: str | None, call_id: str, content: str) -> str:
    label = f' name="{name}"' if name else ""
    return f'<tool_response{label} id="{call_id}">\n{content}\n</tool_response>'


def render_messages(messages: list[ChatMessage], system_prompt: str, tools: str | None = None) -> list[dict[str, str]]:
    """Wire messages -> template messages.

    - `developer` is OpenAI's new name for `system`; Phi-3.5's template knows only `system`.
    - Text parts are joined with newlines (as vLLM does).
    - Phi-3.5 has no tool tokens: an assistant's `tool_calls` become `<tool_call>` blocks in its
      turn, and `tool` results become a user turn of `<tool_response>` blocks (consecutive results
      share one turn), named after the call they answer.
    - The configured system prompt is used only when the request brings no system/developer message;
      an empty system prompt turns it off.
    - `tools` (the tool definitions, see `structured.tools_prompt`) end the first system message.
    """
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or []}
    rendered: list[dict[str, str]] = []
    for m in messages:
        if m.role == "tool":
            block = render_tool_result(names.get(m.tool_call_id), m.tool_call_id, m.text())
            if rendered and rendered[-1].get("tool_results"):
                rendered[-1]["content"] += "\n" + block
            else:
                rendered.append({"role": "user", "content": block, "tool_results": "1"})
            continue
        content = m.text()
        if m.tool_calls:
            content = "\n".join(part for part in (content, render_tool_calls(m.tool_calls)) if part)
        rendered.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    rendered = [{"role": r["role"], "content": r["content"]} for r in rendered]
    if system_prompt and not any(m["role"] == "system" for m in rendered):
        rendered.insert(0, {"role": "system", "content": system_prompt})
    if tools:
        first = next((m for m in rendered if m["role"] == "system"), None)
        if first is None:
            rendered.insert(0, {"role": "system", "content": tools})
        else:
            first["content"] = f"{first['content']}\n\n{tools}" if first["content"] else tools
    return rendered


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already writes every special token it wants (Phi-3.5 adds no BOS).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def resolve_max_tokens(
    prompt_tokens: int, requested: int | None, default: int, context: int, param: str = "messages"
) -> int:
    """The completion budget. A requested max that does not fit is an error (OpenAI's message); the
    configured default shrinks to the room left. `requested` 0 (legacy echo scoring) needs no room."""
    room = context - prompt_tokens
    if requested is not None and prompt_tokens + requested > context:
        raise invalid_request(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {param}, {requested} in the completion). "
            f"Please reduce the length of the {param} or completion.",
            param=param,
            code="context_length_exceeded",
        )
    if room < 1 and requested != 0:
        raise invalid_request(
            f"This model's maximum context length is {context} tokens. However, your {param} resulted in "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Please reduce the length of the {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested if requested is not None else min(default, room)
