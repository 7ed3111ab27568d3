"""Messages -> prompt token ids with the tokenizer's chat template; the default system prompt; the
context-window check."""

from __future__ import annotations

from ptserve.errors import invalid_request
from ptserve.protocol import ChatMessage


def render_messages(messages: list[ChatMessage], system_prompt: str) -> list[dict[str, str]]:
    """Wire messages -> template messages.

    - `developer` is OpenAI's new name for `system`; Phi-3.5's template knows only `system`.
    - Text parts are joined with newlines (as vLLM does).
    - The configured system prompt is used only when the request brings no system/developer message;
      an empty system prompt turns it off.
    """
    rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in rendered):
        rendered.insert(0, {"role": "system", "content": system_prompt})
    return rendered


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already writes every special token it wants (Phi-3.5 adds no BOS).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def resolve_max_tokens(prompt_tokens: int, requested: int | None, default: int, context: int) -> int:
    """The completion budget. A requested max that does not fit is an error (OpenAI's message); the
    configured default shrinks to the room left."""
    room = context - prompt_tokens
    if requested is not None and prompt_tokens + requested > context:
        raise invalid_request(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    if room < 1:
        raise invalid_request(
            f"This model's maximum context length is {context} tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    return requested if requested is not None else min(default, room)
