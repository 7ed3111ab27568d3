"""The engine: token ids and sampling settings in, an async stream of token ids with a finish reason out.

Contract (what the API layer relies on, and what the continuous-batching scheduler keeps):
- `Engine.submit(prompt_ids, params)` returns a `GenerationStream` at once, or raises `EngineFull`
  when `max_queued` requests already wait.
- `async for out in stream` yields `StepOutput(token_ids, finish_reason)`: every token id that was
  produced since the last read (coalesced), and a finish reason on the last one: "stop" (an EOS id),
  "length" (max_tokens or the context window), "abort" (cancelled) or "error" (`stream.error` says
  what failed; the engine keeps serving the others).
- `stream.cancel()` from any thread: the sequence leaves the engine at its next step.
- Requests never mix: each stream sees only its own tokens.

This engine runs one sequence at a time on its own thread, in arrival order; the rest wait.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ptserve.engine.sampling import SamplingParams, make_generator, sample

logger = logging.getLogger(__name__)


class EngineFull(Exception):
    """Too many requests are waiting; retry later."""


@dataclass
class StepOutput:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class GenerationStream:
    """One request's view of the engine. Iterate it from the event loop that submitted it."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    _loop: asyncio.AbstractEventLoop
    _pending: deque = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _finish: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # set with finish_reason "error"

    def cancel(self) -> None:
        self.cancelled.set()

    # Called on the engine thread.
    def _publish(self, token_id: int | None, finish_reason: str | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._receive, token_id, finish_reason)
        except RuntimeError:  # the reader's event loop is gone: nobody will read on
            self.cancelled.set()

    def _receive(self, token_id: int | None, finish_reason: str | None) -> None:
        if token_id is not None:
            self._pending.append(token_id)
        if finish_reason is not None:
            self._finish = finish_reason
        self._ready.set()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            await self._ready.wait()
            self._ready.clear()
            ids = list(self._pending)
            self._pending.clear()
            if self._finish is not None:
                yield StepOutput(ids, self._finish)
                return
            if ids:
                yield StepOutput(ids)


class Engine:
    def __init__(self, model, max_context_length: int, max_queued: int = 256):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_context_length = max_context_length
        self.max_queued = max_queued
        self._waiting: queue.Queue[GenerationStream | None] = queue.Queue()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.running = 0  # sequences being decoded now (0 or 1 here)
        # transformers 5.24 renamed forward(past_key_values=) to forward(cache=); accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # -- public API ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="ptserve-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._waiting.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        if self._waiting.qsize() >= self.max_queued:
            raise EngineFull(f"{self._waiting.qsize()} requests are already waiting (max_queued_requests)")
        stream = GenerationStream(next(self._ids), list(prompt_ids), params, asyncio.get_running_loop())
        self._waiting.put(stream)
        return stream

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    # -- engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            stream = self._waiting.get()
            if stream is None:
                return
            if stream.cancelled.is_set():
                stream._publish(None, "abort")
                continue
            self.running = 1
            try:
                self._generate(stream)
            except Exception as exc:  # one bad sequence must not take the engine down
                logger.exception("generation failed for request %d", stream.request_id)
                stream.error = f"{type(exc).__name__}: {exc}"
                stream._publish(None, "error")
            finally:
                self.running = 0

    @torch.inference_mode()
    def _generate(self, stream: GenerationStream) -> None:
        from transformers import DynamicCache

        params = stream.params
        generator = make_generator(params, self.device)
        cache = DynamicCache(config=self.model.config)
        # 1. prefill: input_ids [1, P] -> logits for the last position [1, V]
        input_ids = torch.tensor([stream.prompt_ids], device=self.device)
        room = self.max_context_length - len(stream.prompt_ids)
        budget = min(params.max_tokens, room)
        stops = set(params.stop_token_ids)
        generated = 0
        while True:
            if stream.cancelled.is_set():
                stream._publish(None, "abort")
                return
            kwargs = {self._cache_kwarg: cache}
            logits = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs).logits
            # 2. sample one token per row: [1, V] -> [1]
            token = sample(logits[:, -1, :], [params], [generator])
            token_id = int(token[0])
            generated += 1
            # 3. retire or continue
            if token_id in stops:
                stream._publish(token_id, "stop")
                return
            if generated >= budget:
                stream._publish(token_id, "length")
                return
            stream._publish(token_id, None)
            input_ids = token.view(1, 1)
