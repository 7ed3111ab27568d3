"""vLLM's `POST /tokenize` and `POST /detokenize`: what context trimmers and front-ends (SillyTavern,
coding agents) use to count tokens through the server.

/tokenize takes a `prompt` (raw text, as /v1/completions reads it) or chat `messages` (rendered exactly
as /v1/chat/completions renders them: the configured system prompt when none is given, tool
definitions, Phi-3.5's template and generation prompt), so `count` equals the `prompt_tokens` a
request with the same input would report. /detokenize turns ids back into text.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from ptserve.errors import invalid_request
from ptserve.prompting import render_messages
from ptserve.protocol import ChatMessage, Tool, _first_error, _Wire, validate_request
from ptserve.structured import tools_prompt


class TokenizeRequest(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = None  # prompt form: Phi-3.5 adds none either way (no BOS)
    add_generation_prompt: bool | None = None  # messages form: default true, as for a chat request
    return_token_strs: bool | None = None


class DetokenizeRequest(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def _parse(model, body: Any):
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {type(body).__name__}.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc) from None


def tokenize(frontend, body: Any) -> dict[str, Any]:
    request = _parse(TokenizeRequest, body)
    if (request.prompt is None) == (request.messages is None):
        raise invalid_request("Send exactly one of 'prompt' (text) or 'messages' (a chat).", param="prompt")
    tokenizer = frontend.tokenizer
    if request.prompt is not None:
        ids = tokenizer(request.prompt, add_special_tokens=bool(request.add_special_tokens))["input_ids"]
    else:
        # Validated and rendered as a chat request with these messages and tools would be.
        chat = validate_request(
            {"model": request.model or "-", "messages": body["messages"], "tools": body.get("tools")}
        )
        messages = render_messages(chat.messages, frontend.config.system_prompt, tools_prompt(chat))
        if request.add_generation_prompt is False:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = frontend.chat_prompt_ids(chat)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": frontend.context_length, "tokens": ids}
    out["token_strs"] = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return out


def detokenize(frontend, body: Any) -> dict[str, Any]:
    request = _parse(DetokenizeRequest, body)
    for i, token in enumerate(request.tokens):
        if not 0 <= token < frontend.vocab_size:
            raise invalid_request(
                f"Invalid 'tokens.[{i}]': token id {token} is out of range; this model's vocabulary has "
                f"{frontend.vocab_size} tokens.",
                param=f"tokens.[{i}]",
            )
    return {"prompt": frontend.tokenizer.decode(request.tokens, skip_special_tokens=False)}
