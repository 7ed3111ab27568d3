"""OpenAI wire types (pydantic) and the one translation from a request to sampling settings.

No defaults hide here: `None` means "not sent" and is resolved in `to_sampling_params`, in the order
request -> server config (config.yaml) -> OpenAI default. Ranges are OpenAI's; the extensions (top_k,
min_p, repetition_penalty, min_tokens, ignore_eos) are vLLM's names and meanings.
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
MAX_N = 128  # OpenAI's limit on choices per request
MAX_TOP_LOGPROBS = 20  # chat completions
MAX_LEGACY_LOGPROBS = 5  # /v1/completions
LOGIT_BIAS_LIMIT = 100.0


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(_Wire):
    """A content part. Only text (and an assistant's refusal) can reach a text-only model; other types
    are refused with a 400 naming the type (see `_check_messages`)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None
    refusal: str | None = None


class FunctionCall(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)  # the SDKs' parsed_arguments and the like: ignored
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(_Wire):
    # Extra keys ignored: the openai SDK's stream helper leaves the delta `index` on the calls it
    # accumulates, and clients send that message back as the conversation's next turn.
    model_config = ConfigDict(extra="allow", strict=True)
    id: str
    type: Literal["function"]
    function: FunctionCall


ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessage(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted; Phi-3.5's template has no place for it
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this answers
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or part.refusal or "" for part in self.content)


NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and response-format names


class FunctionDefinition(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none = the function takes no arguments
    strict: bool | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Wire):
    model_config = ConfigDict(extra="allow", strict=True)  # include_obfuscation: accepted, nothing to obfuscate
    include_usage: bool | None = None


StopString = Annotated[str, StringConstraints(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Wire):
    """Fields both /v1/chat/completions and /v1/completions take. Unknown fields are accepted and
    logged (clients send many)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: StopString | list[StopString] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0)  # 0 = off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0)  # EOS is not allowed before this many tokens
    ignore_eos: bool | None = None  # generate through EOS tokens, up to max_tokens

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def choices(self) -> int:
        return self.n if self.n is not None else 1

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as sorted (token id, bias) pairs; keys were checked by `_check_sampling`."""
        return tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))

    def _top_logprobs(self) -> int | None:
        return None

    def to_sampling_params(self, defaults: GenerationSettings, max_tokens: int) -> SamplingParams:
        """`max_tokens` is already resolved against the context window. The model's EOS ids are added by
        the worker, which has the model; `n` and the per-choice seeds are the worker's too."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature is not None else defaults.temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            top_k=self.top_k if self.top_k is not None else 0,
            min_p=self.min_p if self.min_p is not None else 0.0,
            seed=self.seed,
            frequency_penalty=self.frequency_penalty if self.frequency_penalty is not None else 0.0,
            presence_penalty=self.presence_penalty if self.presence_penalty is not None else 0.0,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else 1.0,
            logit_bias=self.bias_pairs(),
            min_tokens=self.min_tokens if self.min_tokens is not None else 0,
            logprobs=self._top_logprobs(),
        )


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_mode(self) -> str:
        """none | auto | required | named: OpenAI's defaults (auto with tools, none without)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else "named"

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens supersedes the deprecated max_tokens when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _top_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs if self.top_logprobs is not None else 0


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Sampling):
    """POST /v1/completions (legacy): raw text in, no chat template."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo scores the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def _top_logprobs(self) -> int | None:
        return self.logprobs


def validation_param(loc: tuple[Any, ...]) -> str:
    """pydantic's error location -> OpenAI's `param` ("messages.[0].content")."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and (
            "[" in item or item in ("str", "int", "constrained-str", "ContentPart", "NamedToolChoice")
        ):
            continue  # union branch names ("list[ContentPart]", "str"), not fields
        else:
            parts.append(str(item))
    return ".".join(parts)


def validate_request(body: Any) -> ChatCompletionRequest:
    """Raise APIError(400) naming the field, the limit and the value."""
    request = _parse(ChatCompletionRequest, body)
    _check_messages(request.messages)
    if request.top_logprobs is not None and not request.logprobs:
        raise invalid_request("Invalid 'top_logprobs': it requires 'logprobs' to be true.", param="top_logprobs")
    _check_tools(request)
    return request


def _check_tools(request: ChatCompletionRequest) -> None:
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise invalid_request(
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    if request.tool_choice is not None and request.tool_choice != "none" and not request.tools:
        raise invalid_request(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            param="tool_choice",
        )
    names = [t.function.name for t in request.tools or []]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid_request(
                f"Invalid 'tools': function names must be unique; {name!r} appears more than once.",
                param=f"tools.[{i}].function.name",
            )
    if isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.function.name not in names:
        raise invalid_request(
            f"Invalid value for 'tool_choice': no function named {request.tool_choice.function.name!r} in 'tools' "
            f"(have: {', '.join(names)}).",
            param="tool_choice.function.name",
        )


def validate_completion_request(body: Any) -> CompletionRequest:
    request = _parse(CompletionRequest, body)
    prompts = request.prompts()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise invalid_request("Invalid 'prompt': it must not be empty.", param="prompt")
    if request.suffix:
        raise invalid_request(
            "Invalid 'suffix': this model has no fill-in-the-middle mode; send the text to continue in 'prompt'.",
            param="suffix",
        )
    if request.best_of is not None and request.best_of != request.choices():
        raise invalid_request(
            f"Invalid 'best_of': this server returns every sequence it generates, so best_of must equal n "
            f"({request.choices()}) or be left out; got {request.best_of}.",
            param="best_of",
        )
    if request.max_tokens == 0 and not request.echo:
        raise invalid_request(
            "Invalid 'max_tokens': 0 is only useful with 'echo' (to score the prompt); got 0 without echo.",
            param="max_tokens",
        )
    return request


def _parse(model: type[_Sampling], body: Any):
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {type(body).__name__}.")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    if isinstance(request.stop, list) and len(request.stop) > MAX_STOP_SEQUENCES:
        raise invalid_request(
            f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(request.stop)}.",
            param="stop",
        )
    if request.stream_options is not None and not request.stream:
        raise invalid_request(
            "Invalid 'stream_options': it is only allowed when 'stream' is true.", param="stream_options"
        )
    _check_logit_bias(request.logit_bias)
    if request.unknown_fields():
        logger.warning("ignoring request fields this server does not honour: %s", ", ".join(request.unknown_fields()))
    return request


def _check_logit_bias(bias: dict[str, float] | None) -> None:
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise invalid_request(
                f"Invalid 'logit_bias': keys must be token ids (integers as strings), got {key!r}.", param="logit_bias"
            )
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise invalid_request(
                f"Invalid 'logit_bias' for token {key}: values must be between -{LOGIT_BIAS_LIMIT:g} and "
                f"{LOGIT_BIAS_LIMIT:g}, got {value:g}.",
                param="logit_bias",
            )


def check_token_ids(bias: dict[str, float] | None, vocab_size: int) -> None:
    """logit_bias keys must name tokens of this model (the frontend knows the vocabulary)."""
    for key in bias or {}:
        if int(key) >= vocab_size:
            raise invalid_request(
                f"Invalid 'logit_bias': token id {key} is out of range; this model's vocabulary has "
                f"{vocab_size} tokens (ids 0 to {vocab_size - 1}).",
                param="logit_bias",
            )


def _check_messages(messages: list[ChatMessage]) -> None:
    """What the schema alone cannot say, with OpenAI's params and messages."""
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        where = f"messages.[{i}]"
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise invalid_request(
                f"Missing required parameter: '{where}.content'.",
                param=f"{where}.content",
                code="missing_required_parameter",
            )
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            allowed = ("text", "refusal") if m.role == "assistant" else ("text",)
            if part.type not in allowed:
                raise invalid_request(
                    f"Invalid value for '{where}.content.[{j}].type': this model reads text only, so content parts "
                    f"of type {part.type!r} are not supported (allowed: {', '.join(allowed)}).",
                    param=f"{where}.content.[{j}].type",
                )
            if part.type == "text" and part.text is None:
                raise invalid_request(
                    f"Missing required parameter: '{where}.content.[{j}].text'.",
                    param=f"{where}.content.[{j}].text",
                    code="missing_required_parameter",
                )
        if m.tool_calls and m.role != "assistant":
            raise invalid_request(
                f"Invalid '{where}.tool_calls': only assistant messages carry tool calls (role is {m.role!r}).",
                param=f"{where}.tool_calls",
            )
        call_ids.update(call.id for call in m.tool_calls or [])
        if m.role == "tool":
            if m.tool_call_id is None:
                raise invalid_request(
                    f"Missing required parameter: '{where}.tool_call_id'.",
                    param=f"{where}.tool_call_id",
                    code="missing_required_parameter",
                )
            if m.tool_call_id not in call_ids:
                raise invalid_request(
                    f"Invalid parameter: messages with role 'tool' must be a response to a preceding message with "
                    f"'tool_calls'; no earlier tool call has id {m.tool_call_id!r}.",
                    param=f"{where}.tool_call_id",
                )


def _first_error(exc: ValidationError) -> APIError:
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
    if param == "tool_choice":
        return invalid_request(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}. Got {err.get("input")!r}.',
            param=param,
        )
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 200 else type(value).__name__
    return invalid_request(f"Invalid value for '{param}': {err['msg']}. Got {shown}.", param=param)
