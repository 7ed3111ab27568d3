"""The only module that imports litserve: the HTTP endpoints (a LitSpec) and the inference worker
(a LitAPI), and the server built from config.

Request path:
  HTTP process   ChatSpec.chat_completions / completions: auth, body size, validate, model name, prompt
                 ids (Frontend) -> 4xx answered here -> puts a Job on LitServe's request queue
  worker process ChatAPI.predict: Engine.submit_many (n choices x prompts) -> token ids -> TextStream per
                 choice (detokenize, stop strings) -> coalesced {"index", "text", "completion_tokens",
                 "finish_reason", "logprobs"?} messages back
  HTTP process   -> SSE chunks or one body (ptserve.streaming)
A client that goes away (streamed or not, before the first byte included) or a request past
server.request_timeout_s marks its uid cancelled in a shared dict (ptserve.worker.Shared); the worker
holding it drops its sequences at its next poll, whichever of several workers that is. The event loop
never waits on another process (ptserve.link) nor on a long prompt: templates, tokenization and grammar
checks run in a thread. An engine that fails for good makes /health 503, refuses new requests with 503
and stops the server with a non-zero exit code, so an orchestrator restarts it. Every response carries
`x-request-id` (the client's own, or a new one), and every log line about the request names it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from typing import Any

import litserve as ls
import tqdm
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ptserve import chatpage, streaming
from ptserve.config import Config
from ptserve.dialects import anthropic, ollama, responses, tokens
from ptserve.engine.hostmem import one_arena
from ptserve.errors import APIError, envelope, error_body, failure_error
from ptserve.exchange import Deadline, Exchange, ReleasingStreamingResponse, parse_json, read_body
from ptserve.frontend import Frontend, Prepared
from ptserve.job import Job, failure
from ptserve.link import WorkerLink, dead_engines, exit_with_parent
from ptserve.logs import configure_logging, request_id_var
from ptserve.metrics import CONTENT_TYPE, HttpMetrics, TokenClock
from ptserve.protocol import validate_request
from ptserve.transport import PushPullTransport
from ptserve.worker import Shared, Worker

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/health"
RESPONSES_PATH = "/v1/responses"  # OpenAI's Responses API (stateless)
MESSAGES_PATH = "/v1/messages"  # Anthropic's Messages API
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
TOKENIZE_PATH, DETOKENIZE_PATH = "/tokenize", "/detokenize"  # vLLM's
OLLAMA_CHAT_PATH, OLLAMA_GENERATE_PATH = "/api/chat", "/api/generate"  # Ollama's native API
OLLAMA_VERSION_PATH, OLLAMA_TAGS_PATH = "/api/version", "/api/tags"
OLLAMA_SHOW_PATH, OLLAMA_PS_PATH = "/api/show", "/api/ps"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128  # longer or odd client ids are replaced by our own
LOADING_RETRY_AFTER_S = 5
ENGINE_FAILED_GRACE_S = 1.0  # a failed engine's server stays up this long (health 503, errors sent), then exits


def openai_error(status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error, status_code=status, headers=headers)


def error_response(exc: APIError, errors=openai_error) -> Response:
    """`errors(status, OpenAI envelope, headers)` renders it in a dialect's shape."""
    return errors(exc.status, error_body(exc), exc.headers)


# -- HTTP process -----------------------------------------------------------------------------------
class ChatSpec(LitSpec):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.api_path = CHAT_PATH
        self.frontend: Frontend | None = None  # loaded in the API server process only
        self.shared: Shared | None = None  # set by _Server before the processes start
        self.link = WorkerLink()  # replaced by _Server with one over the shared dicts
        self.metrics = HttpMetrics()
        self.created = int(time.time())
        for path, handler, methods in self.routes():
            self.add_endpoint(path, handler, methods)

    def routes(self) -> list[tuple[str, Any, list[str]]]:
        """Every route, one line each: a new dialect adds its module and a line here."""
        return [
            (CHAT_PATH, self.chat_completions, ["POST"]),
            (COMPLETIONS_PATH, self.completions, ["POST"]),
            (MODELS_PATH, self.list_models, ["GET"]),
            (MODELS_PATH + "/{model:path}", self.retrieve_model, ["GET"]),
            (METRICS_PATH, self.metrics_page, ["GET"]),
            (RESPONSES_PATH, self.responses, ["POST"]),
            (MESSAGES_PATH, self.messages, ["POST"]),
            (COUNT_TOKENS_PATH, self.count_tokens, ["POST"]),
            (TOKENIZE_PATH, self.tokenize, ["POST"]),
            (DETOKENIZE_PATH, self.detokenize, ["POST"]),
            (OLLAMA_CHAT_PATH, self.ollama_chat, ["POST"]),
            (OLLAMA_GENERATE_PATH, self.ollama_generate, ["POST"]),
            (OLLAMA_VERSION_PATH, self.ollama_version, ["GET"]),
            (OLLAMA_TAGS_PATH, self.ollama_tags, ["GET"]),
            (OLLAMA_SHOW_PATH, self.ollama_show, ["POST"]),
            (OLLAMA_PS_PATH, self.ollama_ps, ["GET"]),
            *((path, self.ollama_unsupported, methods) for path, (methods, _) in ollama.UNSUPPORTED.items()),
        ]

    def __getstate__(self):
        state = super().__getstate__()
        state["frontend"] = None  # the worker has its own tokenizer
        state["metrics"] = None  # counted in the HTTP process only
        state["link"] = None  # the HTTP process's thread and queue
        return state

    @property
    def stream(self):
        return True

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # -- endpoints ----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        keys = self.config.server.api_keys
        if not keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's SDK sends x-api-key
            given = request.headers.get("x-api-key", "")
        given_bytes = given.strip().encode()
        # Compare with every key (no early exit), each in constant time.
        matches = [secrets.compare_digest(given_bytes, key.encode()) for key in keys]
        if not any(matches):
            raise APIError(
                "Incorrect API key provided. Send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                401,
                code="invalid_api_key",
            )

    def _model_object(self, name: str) -> dict[str, Any]:
        # The context window under vLLM's name and LM Studio's: coding front-ends size prompts by it.
        window = self.frontend.context_length
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "ptserve",
            "max_model_len": window,
            "context_length": window,
        }

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [self._model_object(n) for n in self.frontend.model_names]})

    async def retrieve_model(self, request: Request, model: str) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return error_response(exc)
        if model not in self.frontend.model_names:
            return error_response(
                APIError(
                    f"The model '{model}' does not exist. This server serves: {', '.join(self.frontend.model_names)}.",
                    404,
                    param="model",
                    code="model_not_found",
                )
            )
        return JSONResponse(self._model_object(model))

    async def metrics_page(self, request: Request) -> Response:
        self.link.start()
        self.metrics.workers = self.link.stats  # a plain dict, refreshed by the link's thread
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def health(self, request: Request) -> Response:
        """200 once every worker has loaded the model; 503 while loading, and for good once an engine
        has failed (the server is then stopping: an orchestrator restarts it)."""
        self.link.start()
        if self.link.state == WorkerLink.READY:
            return Response("ok", media_type="text/plain")
        body = {"status": self.link.state}
        if self.link.failure:
            body["error"] = self.link.failure
        return JSONResponse(body, status_code=503)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, self.frontend.prepare, lambda p: self._format(p, chat=True))

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, self.frontend.prepare_completion, lambda p: self._format(p, chat=False))

    async def responses(self, request: Request) -> Response:
        given: dict[str, Any] = {}

        def prepare(body: Any) -> Prepared:
            given["body"] = body  # the response echoes the request's settings
            return self.frontend.prepare(responses.to_chat(body))

        def fmt(prepared: Prepared) -> responses.ResponsesFormat:
            return responses.ResponsesFormat(
                prepared.model, prepared.prompt_tokens, given["body"], prepared.request.tool_mode()
            )

        return await self._serve(request, prepare, fmt)

    async def messages(self, request: Request) -> Response:
        def prepare(body: Any) -> Prepared:
            return self.frontend.prepare(anthropic.to_chat(body))

        def fmt(prepared: Prepared) -> anthropic.MessagesFormat:
            return anthropic.MessagesFormat(prepared.model, prepared.prompt_tokens, prepared.request.tool_mode())

        return await self._serve(request, prepare, fmt, errors=anthropic.error_response)

    async def count_tokens(self, request: Request) -> Response:
        def count(body: Any) -> dict[str, Any]:
            chat = validate_request(anthropic.to_chat(body, count_only=True))
            return anthropic.count_tokens_body(self.frontend.chat_prompt_ids(chat))

        return await self._answer(request, count, errors=anthropic.error_response)

    async def tokenize(self, request: Request) -> Response:
        return await self._answer(request, lambda body: tokens.tokenize(self.frontend, body))

    async def detokenize(self, request: Request) -> Response:
        return await self._answer(request, lambda body: tokens.detokenize(self.frontend, body))

    # Ollama's native API (ptserve.dialects.ollama)
    async def ollama_chat(self, request: Request) -> Response:
        return await self._ollama_generation(request, ollama.CHAT)

    async def ollama_generate(self, request: Request) -> Response:
        return await self._ollama_generation(request, ollama.GENERATE)

    async def _ollama_generation(self, request: Request, kind: str) -> Response:
        """/api/chat and /api/generate. A request with nothing to generate (no messages, an empty prompt) only
        asks Ollama to load the model: answered here, without the engine."""
        try:
            self._authorize(request)
            raw = await read_body(request, self.config.server.max_body_bytes)
            body = await asyncio.to_thread(parse_json, raw)
            loaded = ollama.load_reply(body, kind, self.frontend)
        except APIError as exc:
            logger.info("refused with %d: %s", exc.status, exc.message)
            return error_response(exc, ollama.error_response)
        if loaded is not None:
            return JSONResponse(loaded)

        def prepare(given: Any) -> Prepared:
            return ollama.prepare(self.frontend, given, kind)

        def fmt(prepared: Prepared) -> ollama.OllamaFormat:
            return ollama.OllamaFormat.of(prepared, kind, body.get("model"), self.frontend)

        return await self._serve(ollama.replay(request, raw), prepare, fmt, errors=ollama.error_response)

    async def ollama_version(self, request: Request) -> Response:
        return JSONResponse(ollama.version())  # no key needed: clients probe it to recognize an Ollama server

    async def ollama_tags(self, request: Request) -> Response:
        def tags(_: bytes) -> dict[str, Any]:
            return ollama.catalog(self.frontend).tags()

        return await self._answer(request, tags, errors=ollama.error_response, parse=None)

    async def ollama_ps(self, request: Request) -> Response:
        def ps(_: bytes) -> dict[str, Any]:
            return ollama.catalog(self.frontend).ps()

        return await self._answer(request, ps, errors=ollama.error_response, parse=None)

    async def ollama_show(self, request: Request) -> Response:
        def show(body: Any) -> dict[str, Any]:
            return ollama.catalog(self.frontend).show(body)

        return await self._answer(request, show, errors=ollama.error_response)

    async def ollama_unsupported(self, request: Request) -> Response:
        def answer(raw: bytes) -> dict[str, Any]:
            return ollama.unsupported(request.url.path, raw, self.frontend)

        return await self._answer(request, answer, errors=ollama.error_response, parse=None)

    async def _answer(self, request: Request, compute, errors=openai_error, parse=parse_json) -> Response:
        """An endpoint answered in the HTTP process (no engine): auth, body, `compute(parse(body))` in a
        thread (`parse` None: the raw bytes, empty for a GET)."""
        try:
            self._authorize(request)
            raw = await read_body(request, self.config.server.max_body_bytes)
            return JSONResponse(await asyncio.to_thread(lambda: compute(parse(raw) if parse else raw)))
        except APIError as exc:
            logger.info("refused with %d: %s", exc.status, exc.message)
            return error_response(exc, errors)

    async def _serve(self, request: Request, prepare, make_format, errors=openai_error) -> Response:
        """A generation: `prepare(body) -> Prepared`, `make_format(prepared)` renders the worker's messages
        in the dialect's shapes, `errors` renders refusals in its error envelope."""
        start = time.monotonic()
        deadline = Deadline.after(self.config.server.request_timeout_s)
        self.link.start()
        try:
            self._authorize(request)
            if self.link.state == WorkerLink.FAILED:
                raise APIError(
                    f"The inference engine has failed ({self.link.failure}); the server is restarting. Retry shortly.",
                    503,
                    code="engine_failed",
                    headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
                )
            if not self.link.any_ready:
                raise APIError(
                    f"The model is still loading. Retry after {LOADING_RETRY_AFTER_S} s "
                    "(GET /health says 200 when it is ready).",
                    503,
                    code="model_loading",
                    headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
                )
            raw = await read_body(request, self.config.server.max_body_bytes)
            # Parsing, the chat template, tokenization and grammar checks take long for long prompts:
            # off the event loop, so running streams keep flowing.
            prepared = await asyncio.to_thread(lambda: prepare(parse_json(raw)))
        except APIError as exc:
            logger.info("refused with %d: %s", exc.status, exc.message)
            return error_response(exc, errors)
        prepared.job.request_id = request_id_var.get()
        prepared.clock = TokenClock(self.metrics, start)
        uid = uuid.uuid4().hex
        messages = self._submit(uid, prepared.job)
        try:
            first = await anext(messages)  # "accepted" or an error: decides the HTTP status
        except StopAsyncIteration:
            first = failure("worker_error", "the worker ended the request without an answer")
        if "failure" in first:
            self.response_buffer.pop(uid, None)
            return error_response(failure_error(first), errors)
        self.metrics.prompt_tokens.inc(prepared.prompt_tokens)  # accepted: the engine will read them

        def release(finished: bool) -> None:
            if finished:
                self.response_buffer.pop(uid, None)
            else:  # the client went away, the time ran out, or the worker failed: free the engine's slots
                self._cancel(uid)

        exchange = Exchange(messages, make_format(prepared), prepared, deadline, release)
        if prepared.request.stream:
            return ReleasingStreamingResponse(
                exchange,
                media_type=getattr(exchange.fmt, "media_type", "text/event-stream"),  # Ollama's: NDJSON
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await exchange.complete(request)

    def _format(self, prepared: Prepared, chat: bool):
        req = prepared.request
        if chat:
            return streaming.ChatFormat(prepared.model, req.choices(), req.include_usage(), req.tool_mode())
        return streaming.TextFormat(
            prepared.model,
            prepared.prompt_texts,
            req.choices(),
            req.include_usage(),
            echo=bool(req.echo),
            logprobs=req.logprobs is not None,
        )

    # -- talking to the worker ----------------------------------------------------------------------
    def _send(self, uid: str, job: Job) -> None:
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), (uid, job)))

    def _submit(self, uid: str, job: Job):
        """Send a job; returns the async iterator of the worker's messages for it."""
        q: deque = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=q)
        self._send(uid, job)
        return self._messages(q, event)

    async def _messages(self, q: deque, event: asyncio.Event):
        async for data, status in self.data_streamer(q, event, send_status=True):
            if status == LitAPIStatus.ERROR:
                logger.error("inference worker error: %r", data)
                yield failure("worker_error", repr(data))
                return
            yield json.loads(data)

    def _cancel(self, uid: str) -> None:
        self.response_buffer.pop(uid, None)
        self.link.cancel(uid)  # the worker that holds it picks it up


# -- inference worker process -----------------------------------------------------------------------
class ChatAPI(ls.LitAPI):
    def __init__(self, config: Config):
        super().__init__(spec=ChatSpec(config), enable_async=True, max_batch_size=1)
        self.config = config
        self.shared: Shared | None = None  # set by _Server before the workers start

    def setup(self, device: str) -> None:
        configure_logging()
        exit_with_parent()
        # transformers' loading bars (tqdm) would make a multiprocessing lock, a named semaphore the worker
        # never releases when it is stopped: "resource_tracker: There appear to be 1 leaked semaphore
        # objects" at every Ctrl-C. Its bars never cross processes: a thread lock does.
        tqdm.tqdm.set_lock(threading.RLock())
        self.worker = Worker(self.config, device, self.shared, self.config.server.workers_per_device)

    async def decode_request(self, request, **kwargs):
        return request

    async def encode_response(self, output, **kwargs):
        async for item in output:
            yield item

    async def predict(self, item, **kwargs):
        uid, job = item
        async for message in self.worker.run(uid, job):
            yield message


# -- the server -------------------------------------------------------------------------------------
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(envelope(exc.status_code, str(exc.detail)), status_code=exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(envelope(400, f"Invalid request: {exc.errors()}"), status_code=400)


class RequestContext:
    """ASGI middleware: a request id for every request (the client's `x-request-id` when it is sane,
    else a new one) in the response headers and in every log line written while serving it; requests
    counted by endpoint and status, and their duration, for /metrics."""

    ENDPOINTS = (
        CHAT_PATH,
        COMPLETIONS_PATH,
        MODELS_PATH,
        METRICS_PATH,
        RESPONSES_PATH,
        MESSAGES_PATH,
        COUNT_TOKENS_PATH,
        TOKENIZE_PATH,
        DETOKENIZE_PATH,
        OLLAMA_CHAT_PATH,
        OLLAMA_GENERATE_PATH,
        OLLAMA_VERSION_PATH,
        OLLAMA_TAGS_PATH,
        OLLAMA_SHOW_PATH,
        OLLAMA_PS_PATH,
        *ollama.UNSUPPORTED,
        HEALTH_PATH,
        "/",
    )

    def __init__(self, app, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        ok = 0 < len(given) <= MAX_REQUEST_ID and given.isprintable()
        request_id = given if ok else f"req-{uuid.uuid4().hex[:24]}"
        token = request_id_var.set(request_id)
        endpoint = self._endpoint(scope["path"])
        start = time.monotonic()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint in (
                CHAT_PATH,
                COMPLETIONS_PATH,
                RESPONSES_PATH,
                MESSAGES_PATH,
                OLLAMA_CHAT_PATH,
                OLLAMA_GENERATE_PATH,
            ):
                self.metrics.duration.labels(endpoint).observe(time.monotonic() - start)
            request_id_var.reset(token)

    def _endpoint(self, path: str) -> str:
        if path in self.ENDPOINTS:
            return path
        return MODELS_PATH + "/{model}" if path.startswith(MODELS_PATH + "/") else "other"


class _Server(ls.LitServer):
    """LitServer that answers HTTP while the model loads: /health says 503 until the workers are ready
    (LitServe's own run() does not listen before then). A worker that fails to load, or whose engine
    stops for good later, stops the server (run() then returns False: a non-zero exit).
    It also makes the shared dicts (cancellations, worker counters) that every process sees."""

    load_failed = False
    engine_failed = False

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        self._transport = PushPullTransport.create(num_api_servers)  # not the manager queues (ptserve/transport.py)
        shared = self.shared = Shared(cancelled=manager.dict(), stats=manager.dict())
        for lit_api in self.litapi_connector:
            lit_api.shared = shared
            lit_api.spec.shared = shared
            lit_api.spec.link = WorkerLink(
                self.workers_setup_status, shared, ready=WorkerSetupStatus.READY, error=WorkerSetupStatus.ERROR
            )
        return manager

    def verify_worker_status(self):
        def watch():
            while True:
                states = list(self.workers_setup_status.values())
                if any(v == WorkerSetupStatus.ERROR for v in states):
                    logger.error("the inference worker failed to load the model; shutting down")
                    self.load_failed = True
                    self._shutdown_event.set()
                    return
                if states and all(v == WorkerSetupStatus.READY for v in states):
                    logger.info("model loaded: ready to serve")
                    break
                time.sleep(0.1)
            watch_engines()

        def watch_engines():
            shared = self.shared
            while not self._shutdown_event.is_set():
                try:
                    dead = dead_engines(dict(shared.stats))
                except (OSError, EOFError, BrokenPipeError):  # the manager is gone: shutting down
                    return
                if dead:
                    logger.critical("inference engine failed (%s); shutting down to be restarted", "; ".join(dead))
                    self.engine_failed = True
                    time.sleep(ENGINE_FAILED_GRACE_S)  # /health reads 503 meanwhile; in-flight requests have failed
                    self._shutdown_event.set()
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, name="ptserve-load-watch", daemon=True).start()


def build_server(config: Config, frontend: Frontend | None = None) -> ls.LitServer:
    api = ChatAPI(config)
    api.spec.frontend = frontend or Frontend.load(config)
    middlewares: list = [(RequestContext, {"metrics": api.spec.metrics})]
    if config.server.cors_origins:
        middlewares.append(
            (
                CORSMiddleware,
                {
                    "allow_origins": config.server.cors_origins,
                    "allow_methods": ["*"],
                    "allow_headers": ["*"],
                },
            )
        )
    device = config.model.device
    accelerator = "auto" if device == "auto" else device.split(":")[0]
    server = _Server(
        api,
        accelerator=accelerator,
        devices=config.server.devices,
        workers_per_device=config.server.workers_per_device,
        timeout=False,
        middlewares=middlewares,
    )
    # On SIGTERM uvicorn stops accepting and lets in-flight requests finish for this long, then cancels them.
    server.uvicorn_graceful_timeout = config.server.shutdown_timeout_s
    # The chat page replaces LitServe's "litserve running" at /.
    server.app.router.routes[:] = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    page = chatpage.render(config, context_length=api.spec.frontend.context_length)

    async def chat_page(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    server.app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    # /health from the link's cached view: LitServe's reads the manager dict on the event loop.
    server.app.router.routes[:] = [r for r in server.app.router.routes if getattr(r, "path", None) != HEALTH_PATH]
    server.app.add_api_route(HEALTH_PATH, api.spec.health, methods=["GET"], include_in_schema=False)
    server.app.add_exception_handler(StarletteHTTPException, _http_error)
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    return server


def run(config: Config) -> bool:
    """Serve until stopped; False when the model failed to load or an engine failed for good."""
    server = build_server(config)
    one_arena()  # in the engine processes LitServe spawns next (hostmem.py: why)
    server.run(host=config.server.host, port=config.server.port, generate_client_file=False, num_api_servers=1)
    return not (server.load_failed or server.engine_failed)
