"""One accepted request between the inference worker's messages and the client: SSE chunks or one
body, the request timeout, and a client that goes away. No LitServe here: `api.py` hands over the
message iterator and a `release(finished)` callback that frees (or cancels) the request upstream.
`release` runs exactly once, however the client leaves: mid-stream, mid-body, or before the first byte
(when the response's generator never even starts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ptserve import streaming
from ptserve.errors import CLIENT_CLOSED_REQUEST, APIError, envelope, error_body, failure_error
from ptserve.frontend import Prepared

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deadline:
    """server.request_timeout_s from the request's arrival; `at` None = no limit."""

    limit_s: float | None
    at: float | None

    @classmethod
    def after(cls, limit_s: float | None) -> Deadline:
        return cls(limit_s, None if limit_s is None else time.monotonic() + limit_s)

    def error(self) -> dict[str, Any]:
        return envelope(
            504,
            f"The request did not finish within {self.limit_s:g} s (server.request_timeout_s) and was cancelled. "
            "Ask for fewer tokens (max_tokens) or stream the answer.",
            code="timeout",
        )


@dataclass
class Exchange:
    messages: AsyncIterator[dict[str, Any]]
    fmt: streaming.ChatFormat | streaming.TextFormat
    prepared: Prepared
    deadline: Deadline
    on_release: Callable[[bool], None]
    released: bool = False

    def release(self, finished: bool) -> None:
        """Free the request upstream (finished) or cancel it (not); only the first call counts."""
        if not self.released:
            self.released = True
            self.on_release(finished)

    async def sse(self):
        fmt, prepared = self.fmt, self.prepared
        choices = {i: streaming.Choice(i) for i in range(prepared.job.choices)}
        finished = False
        try:
            for frame in fmt.start():
                yield frame
            while True:
                try:
                    msg = await self._next()
                except TimeoutError:
                    yield fmt.error_frame(self.deadline.error())
                    break
                if msg is None:
                    yield fmt.error_frame(envelope(500, "The inference worker ended the request early."))
                    break
                if "failure" in msg:
                    finished = True
                    yield fmt.error_frame(error_body(failure_error(msg)))
                    break
                choice = choices[msg["index"]]
                prepared.clock.message(msg)
                frames = fmt.delta(
                    msg["index"],
                    msg["text"],
                    logprobs=msg.get("logprobs"),
                    prompt_logprobs=msg.get("prompt_logprobs"),
                    first=not choice.pieces,
                )
                choice.add(msg)
                for frame in frames:
                    yield frame
                if msg["finish_reason"]:
                    for frame in fmt.finish(msg["index"], msg["finish_reason"], stop_string=choice.stop_string):
                        yield frame
                    if all(c.finish_reason for c in choices.values()):
                        finished = True
                        if fmt.include_usage:
                            done = choices.values()
                            completion = sum(c.completion_tokens for c in done)
                            yield fmt.usage(prepared.prompt_tokens, completion, streaming.cached_tokens(done))
                        break
            for frame in fmt.done():
                yield frame
        finally:
            self.release(finished)

    async def complete(self, request: Request) -> Response:
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        finished = False
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():  # the client went away: nobody will read an answer
                logger.info("client disconnected; request cancelled")
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            try:
                result = collect.result()
            except TimeoutError:
                return JSONResponse(*self.fmt.error_body(self.deadline.error(), 504))
            finished = True
            if isinstance(result, APIError):  # the worker's failure
                body, status = self.fmt.error_body(error_body(result), result.status)
                return JSONResponse(body, status_code=status, headers=result.headers)
            return JSONResponse(self.fmt.body(result, self.prepared.prompt_tokens))
        finally:
            collect.cancel()
            gone.cancel()
            self.release(finished)

    async def _collect(self):
        """All choices of a non-streamed request, or the APIError its failure is."""
        choices = [streaming.Choice(i) for i in range(self.prepared.job.choices)]
        while not all(c.finish_reason for c in choices):
            msg = await self._next()
            if msg is None:
                return APIError("The inference worker ended the request early.", 500)
            if "failure" in msg:
                return failure_error(msg)
            self.prepared.clock.message(msg)
            choices[msg["index"]].add(msg)
        return choices

    async def _next(self) -> dict[str, Any] | None:
        """The worker's next message, None when it ended; TimeoutError past the deadline (asyncio.timeout on
        the running task: wait_for made a task for every message)."""
        try:
            if self.deadline.at is None:
                return await anext(self.messages)
            left = max(self.deadline.at - time.monotonic(), 0.0)
            if _timeout is None:  # Python 3.10, where wait_for raises asyncio's own TimeoutError
                try:
                    return await asyncio.wait_for(anext(self.messages), left)
                except asyncio.TimeoutError:
                    raise TimeoutError from None
            async with _timeout(left):
                return await anext(self.messages)
        except StopAsyncIteration:
            return None


_timeout = getattr(asyncio, "timeout", None)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already, so the next ASGI
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ReleasingStreamingResponse(StreamingResponse):
    """The exchange's SSE stream, released however the response ends. Starlette cancels a response whose
    client disconnects; if that happens before the body's generator has started, the generator's own
    `finally` never runs, and the sequence would generate on, unread, until max_tokens."""

    def __init__(self, exchange: Exchange, **kwargs):
        super().__init__(exchange.sse(), **kwargs)
        self.exchange = exchange

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.exchange.release(False)  # a no-op when the stream released itself


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, read up to `limit` bytes (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(
            "We could not parse the JSON body of your request. The body must be valid JSON "
            "(send 'Content-Type: application/json')."
        ) from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        f"The request body is too large: {size} bytes or more; the limit is {limit} bytes (server.max_body_bytes).",
        413,
        code="request_too_large",
    )
