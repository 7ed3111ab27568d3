"""Ollama's native API (`/api/*`), for the editor plugins and tools that speak only Ollama's dialect.

Served: `GET /api/version`, `GET /api/tags`, `POST /api/show`, `GET /api/ps` (answered without the engine),
`POST /api/chat` and `POST /api/generate` (streamed by default, as NDJSON: one JSON object per line).

A request becomes the one internal request (`to_internal`): /api/chat an OpenAI chat body (messages with
`tool_calls` whose `arguments` are objects, tool results named by `tool_name`, `tools`, `format` "json" or a
JSON schema as the response format); /api/generate a chat of one user turn after `system`, or with
`raw: true` a legacy completion of the prompt as written. `options` carry the sampling settings under
Ollama's names (num_predict -> max_tokens, repeat_penalty -> repetition_penalty, temperature, top_p,
top_k, min_p, seed, stop, presence_penalty, frequency_penalty); the runtime knobs (num_ctx, num_gpu,
mirostat, ...) and `keep_alive`, `think`, `template` are accepted and ignored. Extensions of ours, not
Ollama's: /api/chat takes OpenAI's `tool_choice` and `parallel_tool_calls` (Ollama has no way to force a
call). A request with nothing to generate (no messages, an empty prompt) only asks to load or unload
the model: it is answered at once (`load_reply`), done_reason "load" / "unload" (the model stays loaded).

Names: /api/tags lists every served name with Ollama's ":latest" tag, and requests may use either form.
Errors are Ollama's `{"error": "message"}` with the HTTP status; a stream that fails ends with such a line.
What one chat model cannot do (embeddings, pulling other models, pushing, creating, copying, deleting)
gets a 501 naming the reason (`unsupported`); pulling a served name succeeds at once (it is here).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse

from ptserve.errors import APIError, invalid_request
from ptserve.frontend import Prepared
from ptserve.streaming import ChatChunks, Choice, one_line_json

logger = logging.getLogger(__name__)

# The Ollama release whose API this dialect follows. Clients compare it with their minimum (VS Code
# Copilot's Ollama provider wants 0.6.4); 0.9.0 is past those, has tool-call streaming (0.8.0) and the
# `think` field (0.9.0, accepted and ignored here), and claims nothing newer (web search, image output).
VERSION = "0.9.0"
CHAT, GENERATE = "chat", "generate"
LATEST = ":latest"
FAMILY = "phi3"
CAPABILITIES = ["completion", "tools"]
NANOS = 1_000_000_000
MEDIA_TYPE = "application/x-ndjson"

# Ollama's option -> the internal request's field (the same name where none is given).
OPTIONS = {
    "num_predict": "max_tokens",
    "repeat_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Accepted and ignored: how Ollama's own runner loads and samples, nothing this engine has.
IGNORED_OPTIONS = (
    "numa",
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
    "tfs_z",
    "typical_p",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "penalize_newline",
)
IGNORED = ("keep_alive", "think", "template", "truncate", "shift")
# The internal request's parameter names in error messages -> what the Ollama client sent.
RENAMED = {
    **{internal: f"options.{name}" for name, internal in OPTIONS.items()},
    "response_format.json_schema.schema": "format",
    "response_format": "format",
}
_QUOTED_PARAM = re.compile(r"'(" + "|".join(re.escape(k) for k in sorted(RENAMED, key=len, reverse=True)) + r")'")

# What a single chat model cannot do: path -> (methods, why).
UNSUPPORTED = {
    "/api/embed": (["POST"], "this server serves one chat model and computes no embeddings"),
    "/api/embeddings": (["POST"], "this server serves one chat model and computes no embeddings"),
    "/api/pull": (["POST"], "this server serves only the model it was started with and downloads no others"),
    "/api/push": (["POST"], "this server has no model registry to push to"),
    "/api/create": (["POST"], "models are set in the server's configuration (model.id), not created through the API"),
    "/api/copy": (["POST"], "the served names are set in the server's configuration (model.served_name, aliases)"),
    "/api/delete": (["DELETE"], "the served model is set in the server's configuration and cannot be deleted"),
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _line(payload: dict[str, Any]) -> str:
    return one_line_json(payload) + "\n"


# -- errors ---------------------------------------------------------------------------------------------
def error_response(status: int, openai_envelope: dict[str, Any], headers: dict[str, str] | None = None):
    """An error the rest of the server describes in OpenAI's envelope, in Ollama's shape."""
    return JSONResponse({"error": openai_envelope["error"]["message"]}, status_code=status, headers=headers)


def _renamed(exc: APIError) -> APIError:
    """The internal request's parameter names in a message -> the names the Ollama request used."""
    message = _QUOTED_PARAM.sub(lambda m: f"'{RENAMED[m.group(1)]}'", exc.message)
    param = RENAMED.get(exc.param, exc.param) if exc.param else exc.param
    return APIError(message, exc.status, param, exc.code, exc.headers)


def unsupported(path: str, raw: bytes, frontend) -> dict[str, Any]:
    """The endpoints a single chat model cannot serve: 501 whatever the body (even none), except pulling a
    model that is served here, which is done at once."""
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if path == "/api/pull" and isinstance(body, dict):
        name = body.get("model") or body.get("name")
        if isinstance(name, str) and served_name(name, frontend) in frontend.model_names:
            return {"status": "success"}
    methods, why = UNSUPPORTED[path]
    raise APIError(f"{path} is not supported: {why}. Served models: {', '.join(tags_names(frontend))}.", 501)


# -- names ----------------------------------------------------------------------------------------------
def tag(name: str) -> str:
    """A served name as Ollama lists it: with a tag, ":latest" unless it has one."""
    return name if ":" in name else name + LATEST


def tags_names(frontend) -> list[str]:
    return [tag(n) for n in frontend.model_names]


def served_name(requested: str, frontend) -> str:
    """The name a request asks for, ":latest" dropped when the bare name is served."""
    if requested not in frontend.model_names and requested.endswith(LATEST):
        bare = requested[: -len(LATEST)]
        if bare in frontend.model_names:
            return bare
    return requested


def _model(body: dict[str, Any], frontend) -> str:
    """The request's model, checked as every route checks it (404 for another name with strict_names)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    frontend.response_model(served_name(model, frontend))
    return model


def echo_name(requested: Any, prepared_model: str, frontend) -> str:
    """The name a response carries: the one asked for when it is served (either form), else the served name."""
    if isinstance(requested, str) and served_name(requested, frontend) in frontend.model_names:
        return requested
    return tag(prepared_model)


# -- the model: /api/tags, /api/show, /api/ps -----------------------------------------------------------
def parameter_count(cfg) -> int:
    """A Phi-3 (Llama-shaped) decoder's parameters from its config: embeddings, per layer the fused qkv, o,
    fused gate-up and down projections and two RMS norms, the final norm, and the LM head unless tied."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    per_layer = h * (heads + 2 * kv) * head_dim + heads * head_dim * h + h * 2 * inter + inter * h + 2 * h
    embed = cfg.vocab_size * h
    head = 0 if getattr(cfg, "tie_word_embeddings", False) else embed
    return embed + layers * per_layer + h + head


def human_count(n: int) -> str:
    """Ollama's parameter_size: "3.8B", "137M", "7B"."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 or value == int(value) else f"{value:.1f}{unit}"
    return str(n)


def _dtype_name(config, cfg) -> str:
    dtype = config.model.dtype
    if dtype == "auto":
        dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "bfloat16")
    return dtype.removeprefix("torch.")


def quantization(config, cfg) -> tuple[str, float]:
    """(Ollama's quantization_level, bytes per weight) of the weights as the server loads them."""
    q = config.quantization
    if q.mode == "4bit":
        return q.bnb_4bit_quant_type.upper(), 0.5
    if q.mode == "8bit":
        return "INT8", 1.0
    dtype = _dtype_name(config, cfg)
    return {"float32": ("F32", 4.0), "float16": ("F16", 2.0)}.get(dtype, ("BF16", 2.0))


@dataclass
class Catalog:
    """What Ollama's model endpoints say about the one served model, worked out once from its config."""

    frontend: Any
    cfg: Any
    modified_at: str = field(default_factory=_now)

    @property
    def config(self):
        return self.frontend.config

    @functools.cached_property
    def parameters(self) -> int:
        return parameter_count(self.cfg)

    @property
    def size(self) -> int:
        return int(self.parameters * quantization(self.config, self.cfg)[1])

    @property
    def digest(self) -> str:
        source = f"{self.config.model.id}@{self.config.model.revision or 'main'}#{self.config.quantization.mode}"
        return hashlib.sha256(source.encode()).hexdigest()

    @property
    def architecture(self) -> str:
        return getattr(self.cfg, "model_type", None) or FAMILY

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": self.architecture,
            "families": [self.architecture],
            "parameter_size": human_count(self.parameters),
            "quantization_level": quantization(self.config, self.cfg)[0],
        }

    def _entry(self, name: str) -> dict[str, Any]:
        return {"name": name, "model": name, "size": self.size, "digest": self.digest, "details": self.details()}

    def tags(self) -> dict[str, Any]:
        return {"models": [{**self._entry(n), "modified_at": self.modified_at} for n in tags_names(self.frontend)]}

    def ps(self) -> dict[str, Any]:
        entry = self._entry(tag(self.config.model.served_name))
        on_cpu = self.config.model.device == "cpu"
        # Loaded for as long as the server runs; Ollama's CLI shows a far-off expiry as "Forever".
        entry.update(expires_at="9999-12-31T23:59:59Z", size_vram=0 if on_cpu else self.size)
        entry["context_length"] = self.frontend.context_length
        return {"models": [entry]}

    def model_info(self) -> dict[str, Any]:
        cfg, arch = self.cfg, self.architecture
        heads = cfg.num_attention_heads
        info = {
            "general.architecture": arch,
            "general.basename": self.config.model.served_name,
            "general.parameter_count": self.parameters,
            f"{arch}.context_length": self.frontend.context_length,
            f"{arch}.embedding_length": cfg.hidden_size,
            f"{arch}.block_count": cfg.num_hidden_layers,
            f"{arch}.feed_forward_length": cfg.intermediate_size,
            f"{arch}.attention.head_count": heads,
            f"{arch}.attention.head_count_kv": getattr(cfg, "num_key_value_heads", None) or heads,
            f"{arch}.attention.layer_norm_rms_epsilon": getattr(cfg, "rms_norm_eps", None),
            f"{arch}.rope.dimension_count": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            f"{arch}.vocab_size": cfg.vocab_size,
        }
        return {k: v for k, v in info.items() if v is not None}

    def parameters_text(self) -> str:
        gen = self.config.generation
        values = {
            "num_ctx": self.frontend.context_length,
            "num_predict": gen.max_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
        }
        return "\n".join(f"{k:<30} {v:g}" if isinstance(v, float) else f"{k:<30} {v}" for k, v in values.items())

    def show(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise invalid_request(f"The request body must be a JSON object, got {type(body).__name__}.")
        requested = body.get("model") or body.get("name")  # "name": older clients
        if not isinstance(requested, str) or served_name(requested, self.frontend) not in self.frontend.model_names:
            raise APIError(
                f"model '{requested}' not found; this server serves: {', '.join(tags_names(self.frontend))}.",
                404,
                param="model",
                code="model_not_found",
            )
        template = self.frontend.tokenizer.chat_template
        template = template if isinstance(template, str) else ""
        system = self.config.system_prompt
        modelfile = [f"# Modelfile generated by ptserve\nFROM {self.config.model.id}"]
        modelfile += [f"PARAMETER {line}" for line in self.parameters_text().splitlines()]
        if system:
            modelfile.append(f'SYSTEM """{system}"""')
        out = {
            "license": "",
            "modelfile": "\n".join(modelfile) + "\n",
            "parameters": self.parameters_text(),
            "template": template,
            "details": self.details(),
            "model_info": self.model_info(),
            "capabilities": list(CAPABILITIES),
            "modified_at": self.modified_at,
        }
        if system:
            out["system"] = system
        return out


@functools.cache
def catalog(frontend) -> Catalog:
    """The served model's catalog (its config read once, in the HTTP process)."""
    from ptserve.engine import loader

    return Catalog(frontend, loader.load_model_config(frontend.config))


def version() -> dict[str, str]:
    return {"version": VERSION}


# -- requests -------------------------------------------------------------------------------------------
def _keep_alive_zero(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, str) and re.fullmatch(r"0+(\.0*)?[a-z]*", value.strip()) is not None


def load_reply(body: Any, kind: str, frontend) -> dict[str, Any] | None:
    """A request with nothing to generate asks Ollama to load the model (or, with keep_alive 0, to unload
    it): the answer, or None for a request to generate. The model here is always loaded."""
    if not isinstance(body, dict):
        return None
    empty = not body.get("messages") if kind == CHAT else not body.get("prompt")
    if not empty or (kind == GENERATE and body.get("images")):
        return None
    model = _model(body, frontend)
    reason = "unload" if _keep_alive_zero(body.get("keep_alive")) else "load"
    name = echo_name(model, frontend.response_model(served_name(model, frontend)), frontend)
    reply: dict[str, Any] = {"model": name, "created_at": _now()}
    if kind == CHAT:
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    return {**reply, "done": True, "done_reason": reason}


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""  # the ollama client leaves out empty content
    if not isinstance(value, str):
        raise invalid_request(f"Invalid '{where}': expected a string, got {type(value).__name__}.", param=where)
    return value


def _no_images(item: dict[str, Any], where: str = "") -> None:
    if item.get("images"):
        param = f"{where}.images" if where else "images"
        raise invalid_request(f"Invalid '{param}': this model reads text only; images cannot be used.", param=param)


def _arguments(value: Any, where: str) -> str:
    """A call's arguments (an object in Ollama's API; a JSON string tolerated) as the JSON text OpenAI's has."""
    if isinstance(value, str):
        return value
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise invalid_request(f"Invalid '{where}': expected an object.", param=where)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid_request("Invalid 'messages': expected a list of messages.", param="messages")
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []  # every earlier tool call: {"id", "name", "answered"}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid_request(f"Invalid '{where}': expected an object.", param=where)
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise invalid_request(
                f"Invalid '{where}.role': expected system, user, assistant or tool; got {role!r}.",
                param=f"{where}.role",
            )
        _no_images(m, where)
        content = _text(m.get("content"), f"{where}.content")
        if role == "assistant" and m.get("tool_calls"):
            out.append(_assistant_calls(m["tool_calls"], content, calls, where))
        elif role == "tool":
            out.append(_tool_result(m, content, calls, where))
        else:
            out.append({"role": role, "content": content})
    return out


def _assistant_calls(given: Any, content: str, calls: list[dict[str, Any]], where: str) -> dict[str, Any]:
    if not isinstance(given, list):
        raise invalid_request(f"Invalid '{where}.tool_calls': expected a list.", param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(given):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid_request(f"Invalid '{at}.function': expected a name and arguments.", param=f"{at}.function")
        # Ollama's calls need no ids; tool results name their call (newer clients) or its function.
        cid = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else f"call_{len(calls)}"
        calls.append({"id": cid, "name": function["name"], "answered": False})
        arguments = _arguments(function.get("arguments"), f"{at}.function.arguments")
        out.append({"id": cid, "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return {"role": "assistant", "content": content or None, "tool_calls": out}


def _tool_result(m: dict[str, Any], content: str, calls: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """A tool result answers the call it names (tool_call_id), else the first unanswered call of its
    function (tool_name), else the first unanswered call; one that answers none reaches the model as a
    user turn holding the result."""
    name = m.get("tool_name") or m.get("name")
    cid = m.get("tool_call_id")
    open_calls = [c for c in calls if not c["answered"]]
    match = (
        next((c for c in calls if c["id"] == cid), None)
        or next((c for c in open_calls if c["name"] == name), None)
        or (open_calls[0] if open_calls else None)
    )
    if match is None:
        label = f' name="{name}"' if isinstance(name, str) and name else ""
        return {"role": "user", "content": f"<tool_response{label}>\n{content}\n</tool_response>"}
    match["answered"] = True
    return {"role": "tool", "tool_call_id": match["id"], "content": content}


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    tools = body.get("tools")
    fields: dict[str, Any] = {}
    if tools:
        if not isinstance(tools, list):
            raise invalid_request("Invalid 'tools': expected a list of tools.", param="tools")
        out = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise invalid_request(f"Invalid 'tools[{i}].type': only function tools can be used.", param="tools")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise invalid_request(f"Invalid 'tools[{i}].function': expected an object.", param="tools")
            out.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
        fields["tools"] = out
    for key in ("tool_choice", "parallel_tool_calls"):  # ours, OpenAI's shapes: Ollama cannot force a call
        if body.get(key) is not None:
            fields[key] = body[key]
    return fields


def _format(body: dict[str, Any]) -> dict[str, Any]:
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}}
    raise invalid_request(f"Invalid 'format': expected \"json\" or a JSON schema, got {fmt!r}.", param="format")


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise invalid_request("Invalid 'options': expected an object.", param="options")
    out: dict[str, Any] = {}
    for name, internal in OPTIONS.items():
        value = options.get(name)
        if value is None:
            continue
        if name == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            continue  # -1 (until the context is full) and -2 (fill it): the server's default, capped by the room
        out[internal] = float(value) if name == "temperature" and isinstance(value, int) else value
    ignored = [k for k in options if k not in OPTIONS]
    if ignored:
        logger.info("ignoring Ollama options this engine does not use: %s", ", ".join(sorted(ignored)))
    return out


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise invalid_request(f"Invalid 'stream': expected true or false, got {stream!r}.", param="stream")
    return stream


def _logprobs(body: dict[str, Any], raw: bool) -> dict[str, Any]:
    if not body.get("logprobs"):
        return {}
    top = body.get("top_logprobs") or 0
    return {"logprobs": top} if raw else {"logprobs": True, "top_logprobs": top}


def to_internal(body: Any, kind: str, frontend) -> dict[str, Any]:
    """An Ollama /api/chat or /api/generate request -> the OpenAI chat body (or, for a raw generate, the
    legacy completion body) the rest of the server serves (validated there)."""
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {type(body).__name__}.")
    model = served_name(_model(body, frontend), frontend)
    ignored = [k for k in IGNORED if body.get(k) is not None]
    if ignored:
        logger.info("ignoring Ollama fields this server does not use: %s", ", ".join(ignored))
    out: dict[str, Any] = {"model": model, **_options(body), "stream": _stream(body)}
    raw = kind == GENERATE and bool(body.get("raw"))
    out.update(_logprobs(body, raw))
    if kind == CHAT:
        return {**out, "messages": _messages(body), **_tools(body), **_format(body)}
    _no_images(body)
    if body.get("suffix"):
        raise invalid_request(
            "Invalid 'suffix': this model has no fill-in-the-middle mode; send the text to continue in 'prompt'.",
            param="suffix",
        )
    if body.get("context"):
        raise invalid_request(
            "Invalid 'context': this server returns no context and cannot continue one; send the whole "
            "conversation to /api/chat as 'messages' instead.",
            param="context",
        )
    prompt = _text(body.get("prompt"), "prompt")
    if raw:  # the prompt as written: no template, no system prompt
        if body.get("format"):
            raise invalid_request(
                "Invalid 'format': structured output needs the chat template; leave out 'raw' (or 'format').",
                param="format",
            )
        return {**out, "prompt": prompt}
    system = _text(body.get("system"), "system")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {**out, "messages": messages, **_format(body)}


def prepare(frontend, body: Any, kind: str) -> Prepared:
    """Validate and prepare an Ollama request as the OpenAI routes do; errors name Ollama's fields."""
    internal = to_internal(body, kind, frontend)
    try:
        if "prompt" in internal:
            if internal.get("max_tokens") is None:
                internal["max_tokens"] = _raw_budget(frontend, internal["prompt"])
            return frontend.prepare_completion(internal)
        return frontend.prepare(internal)
    except APIError as exc:
        raise _renamed(exc) from None


def _raw_budget(frontend, prompt: str) -> int | None:
    """A raw generate without num_predict: the server's default budget, as for a chat, not the legacy 16."""
    count = len(frontend.tokenizer(prompt)["input_ids"])
    room = frontend.context_length - count
    return min(frontend.config.generation.max_tokens, room) if room >= 1 else None


def replay(request: Request, raw: bytes) -> Request:
    """The request again, its body already read (`raw`): for a handler that looked at the body first. Later
    ASGI messages (the client's disconnect) come from the original."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await request.receive()

    return Request(request.scope, receive)


# -- responses ------------------------------------------------------------------------------------------
class Stopwatch:
    """Times one request for Ollama's durations: its arrival, the first generated token, the end. It stands
    in for the request's metrics clock (which it still feeds) to see the first token arrive."""

    def __init__(self, clock):
        self.clock = clock
        self.start = clock.start if clock is not None else time.monotonic()
        self.first: float | None = None

    def message(self, msg: dict[str, Any]) -> None:
        if self.first is None and msg.get("completion_tokens"):
            self.first = time.monotonic()
        if self.clock is not None:
            self.clock.message(msg)

    def durations(self) -> dict[str, int]:
        end = time.monotonic()
        first = self.first if self.first is not None else end
        return {
            "total_duration": max(int((end - self.start) * NANOS), 1),
            "load_duration": 0,  # loaded before the request, always
            "prompt_eval_duration": max(int((first - self.start) * NANOS), 1),
            "eval_duration": max(int((end - first) * NANOS), 1),  # clients divide by it
        }


def _call(call: dict[str, Any], index: int) -> dict[str, Any]:
    text = call["function"]["arguments"] or "{}"
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:  # cut off by num_predict: what was written, as a string
        arguments = {"_partial": text}
    return {"id": call["id"], "function": {"index": index, "name": call["function"]["name"], "arguments": arguments}}


@dataclass
class OllamaFormat:
    """The engine's output in Ollama's shapes (/api/chat's `message`, /api/generate's `response`); NDJSON
    lines when streamed. What `exchange.Exchange` drives."""

    model: str
    kind: str  # CHAT or GENERATE
    watch: Stopwatch
    tool_mode: str = "none"
    logprobs: bool = False
    include_usage: bool = True  # usage() writes the last line, done: true with the counts
    media_type: ClassVar[str] = MEDIA_TYPE
    _calls: list[dict[str, Any]] = field(default_factory=list)  # streamed calls: {"id", "name", "arguments"}
    _sent: int = 0  # calls already written
    _done_reason: str = "stop"

    def __post_init__(self):
        self._chat = ChatChunks(self.model, 1, include_usage=True, tool_mode=self.tool_mode)

    @classmethod
    def of(cls, prepared: Prepared, kind: str, requested: Any, frontend) -> OllamaFormat:
        """The format of a prepared request; its stopwatch replaces (and feeds) the request's metrics clock."""
        watch = Stopwatch(prepared.clock)
        prepared.clock = watch
        req = prepared.request
        tool_mode = req.tool_mode() if hasattr(req, "tool_mode") else "none"
        logprobs = req.logprobs is not None and req.logprobs is not False
        return cls(echo_name(requested, prepared.model, frontend), kind, watch, tool_mode, logprobs)

    def _head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": _now()}

    def _piece(self, content: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if self.kind == GENERATE:
            return {"response": content}
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {"message": message}

    # streamed
    def start(self) -> list[str]:
        self._chat.start()  # the role chunk: nothing to say in this dialect
        return []

    def delta(self, index: int, text: str, logprobs: list[dict[str, Any]] | None = None, **_: Any) -> list[str]:
        pieces = self._pieces(self._chat.delta(index, text))
        if logprobs and self.logprobs:
            pieces = pieces or [self._piece("")]
            pieces[0]["logprobs"] = logprobs
        return [_line({**self._head(), **p, "done": False}) for p in pieces]

    def finish(self, index: int, reason: str, stop_string: str | None = None, **_: Any) -> list[str]:
        pieces = self._pieces(self._chat.finish(index, reason))
        pieces += self._flush(final=True)
        self._done_reason = "length" if reason == "length" else "stop"
        return [_line({**self._head(), **p, "done": False}) for p in pieces]

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> str:
        return _line(self._last(prompt_tokens, completion_tokens, self._piece("")))

    def done(self) -> list[str]:
        return []

    def error_frame(self, error: dict[str, Any]) -> str:
        return _line({"error": error["error"]["message"]})

    def error_body(self, error: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
        return {"error": error["error"]["message"]}, status

    def _last(self, prompt_tokens: int, completion_tokens: int, piece: dict[str, Any]) -> dict[str, Any]:
        return {
            **self._head(),
            **piece,
            "done": True,
            "done_reason": self._done_reason,
            **self.watch.durations(),
            "prompt_eval_count": prompt_tokens,
            "eval_count": completion_tokens,
        }

    def _pieces(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chat chunks -> Ollama pieces: text as it comes, each tool call once its arguments are complete."""
        pieces: list[dict[str, Any]] = []
        for chunk in chunks:
            delta = chunk["choices"][0]["delta"]
            if delta.get("content"):
                pieces.append(self._piece(delta["content"]))
            for call in delta.get("tool_calls") or []:
                if "id" in call:  # a call's first delta names it
                    pieces += self._flush(final=True)  # the one before is complete
                    self._calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
                self._calls[-1]["arguments"] += call.get("function", {}).get("arguments") or ""
                pieces += self._flush(final=False)
        return pieces

    def _flush(self, final: bool) -> list[dict[str, Any]]:
        """The calls not yet written whose arguments are complete JSON (or all of them, when `final`)."""
        pieces = []
        while self._sent < len(self._calls):
            call = self._calls[self._sent]
            if not final:
                try:
                    json.loads(call["arguments"])
                except json.JSONDecodeError:
                    break
            chat_call = {"id": call["id"], "function": {"name": call["name"], "arguments": call["arguments"]}}
            pieces.append(self._piece("", [_call(chat_call, self._sent)]))
            self._sent += 1
        return pieces

    # one body
    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        chat = self._chat.body(choices, prompt_tokens)
        [choice] = chat["choices"]
        message = choice["message"]
        self._done_reason = "length" if choice["finish_reason"] == "length" else "stop"
        calls = [_call(c, i) for i, c in enumerate(message.get("tool_calls") or [])]
        piece = self._piece(message.get("content") or "", calls)
        if self.logprobs:
            piece["logprobs"] = choices[0].logprobs or []
        return self._last(prompt_tokens, choices[0].completion_tokens, piece)
