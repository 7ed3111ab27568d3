"""OpenAI wire types (pydantic) and the one translation from a request to sampling settings.

No defaults hide here: `None` means "not sent" and is resolved in `to_sampling_params`, in the order
request -> server config (config.yaml) -> OpenAI default.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ptserve.config import GenerationSettings
from ptserve.engine.sampling import SamplingParams
from ptserve.errors import APIError, invalid_request

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ChatMessage(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)  # e.g. "name": accepted, not rendered by Phi-3.5
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)  # include_obfuscation: accepted, nothing to obfuscate
    include_usage: bool | None = None


StopString = Annotated[str, StringConstraints(min_length=1)]


class ChatCompletionRequest(_Wire):
    """POST /v1/chat/completions. Unknown fields are accepted and logged (clients send many)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # extension (vLLM, TGI): 0 = off
    ignore_eos: bool | None = None  # extension (vLLM): generate through EOS tokens, up to max_tokens
    n: int | None = Field(None, ge=1, le=1)
    seed: int | None = None
    stop: StopString | list[StopString] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens supersedes the deprecated max_tokens when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, defaults: GenerationSettings, max_tokens: int) -> SamplingParams:
        """`max_tokens` is already resolved against the context window (prompting.resolve_max_tokens).
        The model's EOS ids are added by the worker, which has the model."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature is not None else defaults.temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            top_k=self.top_k if self.top_k is not None else 0,
            seed=self.seed,
        )


def validation_param(loc: tuple[Any, ...]) -> str:
    """pydantic's error location -> OpenAI's `param` ("messages.[0].content")."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("str", "list[TextPart]", "list[constrained-str]", "constrained-str", "TextPart"):
            continue  # union branch names, not fields
        else:
            parts.append(str(item))
    return ".".join(parts)


def validate_request(body: Any) -> ChatCompletionRequest:
    """Raise APIError(400) naming the field, the limit and the value."""
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {type(body).__name__}.")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc, body) from None
    if request.stop is not None and isinstance(request.stop, list) and len(request.stop) > MAX_STOP_SEQUENCES:
        raise invalid_request(
            f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(request.stop)}.",
            param="stop",
        )
    if request.stream_options is not None and not request.stream:
        raise invalid_request(
            "Invalid 'stream_options': it is only allowed when 'stream' is true.", param="stream_options"
        )
    if request.unknown_fields():
        logger.warning("ignoring request fields this server does not honour: %s", ", ".join(request.unknown_fields()))
    return request


def _first_error(exc: ValidationError, body: dict) -> APIError:
    errors = exc.errors()
    # Prefer a concrete error over the union's "did not match either branch" noise.
    err = next((e for e in errors if e["type"] not in ("literal_error",)), errors[0])
    lit = next((e for e in errors if e["type"] == "literal_error"), None)
    if lit is not None and len(lit["loc"]) >= 3 and lit["loc"][-1] == "role":
        err = lit
    param = validation_param(err["loc"])
    if err["type"] == "missing":
        return invalid_request(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 200 else type(value).__name__
    return invalid_request(f"Invalid value for '{param}': {err['msg']}. Got {shown}.", param=param)
