"""The only module that imports litserve: the HTTP endpoints (a LitSpec) and the inference worker
(a LitAPI), and the server built from config.

Request path:
  HTTP process   ChatSpec.chat_completions: auth, validate, prompt ids (Frontend) -> 400s answered here
                 -> puts a Job on LitServe's request queue
  worker process ChatAPI.predict: Engine.submit -> token ids -> TextStream (detokenize, stop strings)
                 -> coalesced {"text", "completion_tokens", "finish_reason"} messages back
  HTTP process   -> SSE chunks or one chat.completion body (ptserve.streaming)
A client that goes away sends a cancel Job for its uid; the engine drops the sequence at its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from typing import Any

import litserve as ls
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ptserve import streaming
from ptserve.config import Config
from ptserve.engine.detokenize import TextStream
from ptserve.engine.scheduler import Engine, EngineFull, NeverFits
from ptserve.errors import APIError, envelope, error_body
from ptserve.frontend import Frontend, Job
from ptserve.logs import configure_logging

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
RETRY_AFTER_S = 1


@dataclasses.dataclass
class Cancel:
    uid: str


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


# -- HTTP process -----------------------------------------------------------------------------------
class ChatSpec(LitSpec):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.api_path = CHAT_PATH
        self.frontend: Frontend | None = None  # loaded in the API server process only
        self.created = int(time.time())
        self.add_endpoint(CHAT_PATH, self.chat_completions, ["POST"])
        self.add_endpoint(MODELS_PATH, self.list_models, ["GET"])

    def __getstate__(self):
        state = super().__getstate__()
        state["frontend"] = None  # the worker has its own tokenizer
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
        key = self.config.server.api_key
        if not key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(
                "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.", 401, code="invalid_api_key"
            )

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return error_response(exc)
        model = {"id": self.config.model.served_name, "object": "model", "created": self.created, "owned_by": "ptserve"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            prepared = self.frontend.prepare(await _json_body(request))
        except APIError as exc:
            return error_response(exc)
        chat = prepared.request
        uid = uuid.uuid4().hex
        messages = self._submit(uid, prepared.job)
        try:
            first = await anext(messages)  # "accepted" or an error: decides the HTTP status
        except StopAsyncIteration:
            first = {"error": envelope(500, "The inference worker ended the request without an answer.")}
        if "error" in first:
            self.response_buffer.pop(uid, None)
            status = first.get("status", 500)
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
            return JSONResponse(first["error"], status_code=status, headers=headers)
        prompt_tokens = len(prepared.job.prompt_ids)
        if chat.stream:
            writer = streaming.ChunkWriter(self.config.model.served_name, chat.include_usage())
            return StreamingResponse(
                self._sse(uid, messages, writer, prompt_tokens),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._complete(uid, messages, prompt_tokens)

    # -- talking to the worker ----------------------------------------------------------------------
    def _send(self, uid: str, job: Job | Cancel) -> None:
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
                yield {"error": envelope(500, "The inference worker failed on this request."), "status": 500}
                return
            yield json.loads(data)

    def _cancel(self, uid: str) -> None:
        self.response_buffer.pop(uid, None)
        self._send(uid + "-cancel", Cancel(uid))  # nobody waits for an answer to a cancel

    async def _sse(self, uid: str, messages, writer: streaming.ChunkWriter, prompt_tokens: int):
        finished = False
        try:
            yield writer.role()
            async for msg in messages:
                if "error" in msg:
                    finished = True
                    yield streaming.sse(msg["error"])
                    break
                if msg["text"]:
                    yield writer.content(msg["text"])
                if msg["finish_reason"]:
                    finished = True
                    yield writer.finish(msg["finish_reason"])
                    if writer.include_usage:
                        yield writer.usage(prompt_tokens, msg["completion_tokens"])
                    break
            yield streaming.DONE
        finally:
            if finished:
                self.response_buffer.pop(uid, None)
            else:  # the client went away (or the worker did): free the engine's slot
                self._cancel(uid)

    async def _complete(self, uid: str, messages, prompt_tokens: int) -> Response:
        pieces: list[str] = []
        try:
            async for msg in messages:
                if "error" in msg:
                    return JSONResponse(msg["error"], status_code=msg.get("status", 500))
                pieces.append(msg["text"])
                if msg["finish_reason"]:
                    body = streaming.chat_completion(
                        streaming.completion_id(),
                        int(time.time()),
                        self.config.model.served_name,
                        "".join(pieces),
                        msg["finish_reason"],
                        prompt_tokens,
                        msg["completion_tokens"],
                    )
                    self.response_buffer.pop(uid, None)
                    return JSONResponse(body)
            return JSONResponse(envelope(500, "The inference worker ended the request early."), status_code=500)
        finally:
            if uid in self.response_buffer:
                self._cancel(uid)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(
            "We could not parse the JSON body of your request. The body must be valid JSON "
            "(send 'Content-Type: application/json')."
        ) from None


# -- inference worker process -----------------------------------------------------------------------
class ChatAPI(ls.LitAPI):
    def __init__(self, config: Config):
        super().__init__(spec=ChatSpec(config), enable_async=True, max_batch_size=1)
        self.config = config

    def setup(self, device: str) -> None:
        from ptserve.engine import loader

        configure_logging()
        loaded = loader.load(self.config, device)
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = tuple(loaded.eos_token_ids)
        server = self.config.server
        engine = Engine(
            loaded.model,
            loaded.max_context_length,
            max_queued=server.max_queued_requests,
            max_seqs=server.max_concurrent_sequences,
            kv_budget_bytes=loader.kv_cache_bytes(self.config, loaded.device),
        )
        logger.info(
            "engine: %d sequences at once, KV cache budget %d tokens (%.2f GB)",
            server.max_concurrent_sequences,
            engine.kv_budget_tokens,
            engine.kv_budget_tokens * engine.bytes_per_token / 1e9,
        )
        self.engine = engine.start()
        self.streams: dict[str, Any] = {}

    async def decode_request(self, request, **kwargs):
        return request

    async def encode_response(self, output, **kwargs):
        async for item in output:
            yield item

    async def predict(self, item, **kwargs):
        uid, job = item
        if isinstance(job, Cancel):
            stream = self.streams.get(job.uid)
            if stream is not None:
                stream.cancel()
            return
        params = dataclasses.replace(job.params, stop_token_ids=() if job.ignore_eos else self.eos_token_ids)
        try:
            stream = self.engine.submit(job.prompt_ids, params)
        except EngineFull as exc:
            message = f"The server is busy: {exc}. Retry after {RETRY_AFTER_S} s."
            yield {"error": envelope(429, message, code="queue_full"), "status": 429}
            return
        except NeverFits as exc:
            message = f"This request can never fit the server's KV cache: {exc}. Lower max_tokens or the prompt."
            yield {"error": envelope(400, message, param="max_tokens", code="kv_cache_exceeded"), "status": 400}
            return
        self.streams[uid] = stream
        yield {"accepted": True}
        try:
            async for message in _text_messages(stream, TextStream(self.tokenizer, job.stop)):
                yield message
        finally:
            self.streams.pop(uid, None)
            stream.cancel()  # no-op when finished; frees the slot if this task was cancelled


async def _text_messages(stream, text: TextStream):
    """Engine outputs -> {"text", "completion_tokens", "finish_reason"}, one message per engine read."""
    produced = 0
    async for out in stream:
        if out.finish_reason == "error":
            yield {"error": envelope(500, f"Generation failed: {stream.error}"), "status": 500}
            return
        pieces, finish = [], None
        for token_id in out.token_ids:
            produced += 1
            pieces.append(text.add(token_id))
            if text.stopped:  # a stop string: tokens after it are dropped and not counted
                stream.cancel()
                finish = "stop"
                break
        if finish is None and out.finish_reason is not None:
            pieces.append(text.finish())
            finish = "stop" if text.stopped else out.finish_reason
        chunk = "".join(pieces)
        if chunk or finish:
            yield {"text": chunk, "completion_tokens": produced, "finish_reason": finish}
        if finish:
            return


# -- the server -------------------------------------------------------------------------------------
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(envelope(exc.status_code, str(exc.detail)), status_code=exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(envelope(400, f"Invalid request: {exc.errors()}"), status_code=400)


class _Server(ls.LitServer):
    """LitServer that answers HTTP while the model loads: /health says 503 until the worker is ready
    (LitServe's own run() does not listen before then). A worker that fails to load stops the server."""

    load_failed = False

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
                    return
                time.sleep(0.1)

        threading.Thread(target=watch, name="ptserve-load-watch", daemon=True).start()


def build_server(config: Config, frontend: Frontend | None = None) -> ls.LitServer:
    api = ChatAPI(config)
    api.spec.frontend = frontend or Frontend.load(config)
    middlewares = []
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
    server = _Server(api, accelerator=accelerator, devices=1, timeout=False, middlewares=middlewares, fast_queue=True)
    server.app.add_exception_handler(StarletteHTTPException, _http_error)
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    return server


def run(config: Config) -> bool:
    """Serve until stopped; False when the model failed to load."""
    server = build_server(config)
    server.run(host=config.server.host, port=config.server.port, generate_client_file=False, num_api_servers=1)
    return not server.load_failed
