"""The engine: continuous batching at token granularity.

Contract (what the API layer relies on):
- `Engine.submit(prompt_ids, params)` returns a `GenerationStream` at once, or raises `EngineFull`
  when `max_queued` requests already wait, `NeverFits` when the request could never fit the KV
  cache budget, or `EngineDead` once the engine has stopped for good.
- `Engine.submit_many([(prompt_ids, params), ...])` does the same for several sequences (a request's
  `n` choices or its several prompts), all or none.
- `async for out in stream` yields `StepOutput(token_ids, finish_reason, logprobs)`: every token id
  produced since the last read (coalesced), their log-probabilities when `params.logprobs` is set,
  and a finish reason on the last one: "stop" (an EOS id),
  "length" (max_tokens or the context window), "abort" (cancelled) or "error" (`stream.error` says
  what failed; the engine keeps serving the others).
- `stream.prompt_logprobs` holds the prompt's log-probabilities (when `params.prompt_logprobs` is set)
  before the first output arrives; `max_tokens=0` scores the prompt and generates nothing.
- `stream.cancel()` from any thread: the sequence leaves the batch at the next step.
- A step that fails (out of memory, a bad row) fails the rows in that forward pass with "error"; the
  engine serves on. A failure that leaves the device unusable (a CUDA error other than out of memory) or
  kills the engine thread fails every request at once, sets `engine.dead` and makes `submit` raise
  `EngineDead`: the process must be restarted (the worker reports it; /health says 503).
- Requests never mix: each row has its own cache slot, positions, sampling settings and RNG.

One engine thread loops:
  1. admit   waiting requests become a prefill group (up to max_seqs rows, within the KV budget)
  2. prefill the group in one padded forward pass (a long prompt alone goes in chunks, one per
             iteration, so running streams keep getting tokens); finished groups join the batch
  3. decode  one token for every running row in one forward pass, each row at its own position
  4. retire  finished and cancelled rows leave; their slot goes to the last row
and sleeps on the queue when there is nothing to do (no busy polling).
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

from ptserve.engine.grammar import GrammarBackend
from ptserve.engine.hostmem import release_host_memory
from ptserve.engine.kvcache import SlotKVCache, attention_mask
from ptserve.engine.sampling import RowState, SamplingParams, TokenLogprob, logprobs_of, next_tokens

logger = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 512  # prompt tokens per prefill pass: bounds how long running streams wait


class EngineFull(Exception):
    """Too many requests are waiting; retry later."""


class NeverFits(Exception):
    """The request needs more KV cache than the whole budget."""


class EngineDead(Exception):
    """The engine has stopped for good (its thread died or the device failed)."""


# Errors after which the device cannot be trusted again: the CUDA context is lost, every later call fails.
FATAL_MARKERS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "CUDNN_STATUS", "illegal memory access")


def is_fatal(exc: BaseException) -> bool:
    """Whether `exc` leaves the engine unusable. Out of memory is not: the step's rows fail, the rest go on."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt... in the engine thread
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return any(marker in str(exc) for marker in FATAL_MARKERS)


@dataclass
class StepOutput:
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked


@dataclass(eq=False)  # identity semantics: two streams are never "equal"
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
    prompt_logprobs: list[TokenLogprob | None] | None = None  # [None, lp(token 1), ...] when asked

    def cancel(self) -> None:
        self.cancelled.set()

    # Called on the engine thread.
    def _publish(self, token_id: int | None, finish_reason: str | None, logprob: TokenLogprob | None = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._receive, token_id, finish_reason, logprob)
        except RuntimeError:  # the reader's event loop is gone: nobody will read on
            self.cancelled.set()

    def _publish_prompt_logprobs(self, logprobs: list[TokenLogprob | None]) -> None:
        # Queued on the reader's loop before the first token, so it is there when that arrives.
        try:
            self._loop.call_soon_threadsafe(setattr, self, "prompt_logprobs", logprobs)
        except RuntimeError:
            self.cancelled.set()

    def _receive(self, token_id: int | None, finish_reason: str | None, logprob: TokenLogprob | None) -> None:
        if token_id is not None:
            self._pending.append((token_id, logprob))
        if finish_reason is not None:
            self._finish = finish_reason
        self._ready.set()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            await self._ready.wait()
            self._ready.clear()
            ids = [t for t, _ in self._pending]
            logprobs = [lp for _, lp in self._pending] if self.params.logprobs is not None else None
            self._pending.clear()
            if self._finish is not None:
                yield StepOutput(ids, self._finish, logprobs)
                return
            if ids:
                yield StepOutput(ids, None, logprobs)


@dataclass(eq=False)
class _Row:
    """Per-sequence state; its index in `Engine._rows` is its cache slot."""

    stream: GenerationStream
    state: RowState  # sampling settings, RNG and the history penalties need
    budget: int  # tokens it may generate (max_tokens, capped by the context window)
    prefilled: int = 0  # prompt tokens already in the cache
    length: int = 0  # tokens in the cache
    last_token: int = -1
    finish: str | None = None
    scored: list[TokenLogprob | None] = field(default_factory=list)  # prompt logprobs so far

    @property
    def generated(self) -> int:
        return self.state.generated

    @property
    def reserve(self) -> int:
        return len(self.stream.prompt_ids) + self.budget


class Engine:
    def __init__(
        self,
        model,
        max_context_length: int,
        max_queued: int = 256,
        max_seqs: int = 64,
        kv_budget_bytes: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK_TOKENS,
        grammars: GrammarBackend | None = None,
        vocab_limit: int | None = None,
    ):
        self.model = model
        self.grammars = grammars
        self.vocab_limit = vocab_limit  # ids past the tokenizer's (no text) are never sampled
        self.device = next(model.parameters()).device
        self.max_context_length = max_context_length
        self.max_queued = max_queued
        self.max_seqs = max_seqs
        self.prefill_chunk = prefill_chunk
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.kv_dtype = model.get_input_embeddings().weight.dtype
        if self.kv_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            self.kv_dtype = torch.bfloat16
        layout = (cfg.num_hidden_layers, kv_heads, head_dim, self.kv_dtype, self.device)
        self.cache = SlotKVCache(*layout)
        self._prefill_cache = SlotKVCache(*layout)
        self.bytes_per_token = SlotKVCache.bytes_per_token(cfg.num_hidden_layers, kv_heads, head_dim, self.kv_dtype)
        # Padded rows: the batch holds rows x (longest reservation) positions; the budget caps that.
        full = max_seqs * max_context_length
        self.kv_budget_tokens = min(full, kv_budget_bytes // self.bytes_per_token) if kv_budget_bytes else full
        self.vocab_size = cfg.vocab_size
        self._base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        # transformers 5.24 renamed forward(past_key_values=) to forward(cache=); accept both.
        params = inspect.signature(self._base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._waiting: queue.Queue[GenerationStream | None] = queue.Queue()
        self._held: deque[GenerationStream] = deque()  # taken off the queue, not yet admitted
        self._rows: list[_Row] = []  # running (decoding) rows, in cache-slot order
        self._group: list[_Row] = []  # the prefill group in progress
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: str | None = None  # why the engine stopped for good

    # -- public API ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="ptserve-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stopping = True
        self._waiting.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[GenerationStream]:
        """Several sequences (a request's `n` choices, or its several prompts), queued together or not at all."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        for prompt_ids, params in jobs:
            need = min(len(prompt_ids) + params.max_tokens, self.max_context_length)
            if need > self.kv_budget_tokens:
                raise NeverFits(
                    f"the request needs {need} tokens of KV cache ({len(prompt_ids)} prompt + up to "
                    f"{params.max_tokens} completion) but the whole cache holds {self.kv_budget_tokens}"
                )
        if len(jobs) > self.max_queued:
            raise NeverFits(f"it asks for {len(jobs)} sequences but at most {self.max_queued} may wait at once")
        if self.queued + len(jobs) > self.max_queued:
            raise EngineFull(f"{self.queued} requests are already waiting (max_queued_requests={self.max_queued})")
        loop = asyncio.get_running_loop()
        streams = [GenerationStream(next(self._ids), list(ids), params, loop) for ids, params in jobs]
        for stream in streams:
            self._waiting.put(stream)
        if self.dead is not None:  # it died while these were queued: nobody will take them
            for stream in streams:
                stream.error = self.dead
                stream._publish(None, "error")
        return streams

    @property
    def queued(self) -> int:
        return self._waiting.qsize() + len(self._held)

    @property
    def running(self) -> int:
        return len(self._rows) + len(self._group)

    @property
    def kv_reserved_tokens(self) -> int:
        """Positions the running sequences hold: padded rows x the longest reservation (read racily from
        another thread: a gauge, not an invariant)."""
        rows = list(self._rows) + list(self._group)
        return len(rows) * max((r.reserve for r in rows), default=0)

    # -- engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self._take_arrivals(block=not (self._rows or self._group or self._held)):
                    break
                with torch.inference_mode():
                    self._admit()
                    if self._group:
                        self._guarded(self._prefill_step, "prefill")
                    if self._rows:
                        self._guarded(self._decode_step, "decode")
                    self._retire()
                if not (self._rows or self._group) and (
                    self.cache.allocated_tokens() or self._prefill_cache.allocated_tokens()
                ):
                    self.cache.release()
                    self._prefill_cache.release()  # it held the longest prompt seen, for good
                    release_host_memory()
        except BaseException as exc:
            self._die(exc)

    def _guarded(self, step, name: str) -> None:
        """Run a step; a failure fails the rows in its forward pass, not the engine (unless it is fatal)."""
        try:
            step()
        except Exception as exc:
            if is_fatal(exc):
                raise
            logger.exception("engine %s step failed", name)
            rows = self._group if name == "prefill" else self._rows
            self._fail(rows, f"{type(exc).__name__}: {exc}")
            if name == "prefill":
                self._group = []
            else:
                self._rows = []
                self.cache.release()
            if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _die(self, exc: BaseException) -> None:
        """The engine cannot go on: fail every request it holds or will be handed, at once."""
        self.dead = f"{type(exc).__name__}: {exc}"
        logger.critical("engine stopped for good: %s", self.dead, exc_info=exc)
        self._fail(self._rows + self._group, self.dead)
        self._rows, self._group = [], []
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._held.append(item)
        while self._held:
            stream = self._held.popleft()
            stream.error = self.dead
            stream._publish(None, "error")
        try:
            self.cache.release()
            self._prefill_cache.release()
        except Exception:  # the device may refuse even this
            pass

    def _take_arrivals(self, block: bool) -> bool:
        """Move queued streams to `_held`; False on shutdown."""
        try:
            item = self._waiting.get(block=block)
            while True:
                if item is None:
                    return False
                self._held.append(item)
                item = self._waiting.get_nowait()
        except queue.Empty:
            return True

    # 1. admit ------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._held and self._held[0].cancelled.is_set():
            self._held.popleft()._publish(None, "abort")
        if self._group or not self._held:
            return
        tokens = 0
        longest = max((r.reserve for r in self._rows), default=0)
        while self._held and len(self._rows) + len(self._group) < self.max_seqs:
            stream = self._held[0]
            if stream.cancelled.is_set():
                self._held.popleft()._publish(None, "abort")
                continue
            prompt = len(stream.prompt_ids)
            budget = min(stream.params.max_tokens, self.max_context_length - prompt)
            rows_after = len(self._rows) + len(self._group) + 1
            if rows_after * max(longest, prompt + budget) > self.kv_budget_tokens:
                break  # waits until running rows leave
            if self._group and tokens + prompt > self.prefill_chunk:
                break  # next iteration's group
            self._held.popleft()
            try:
                state = RowState.create(stream.params, stream.prompt_ids, self.vocab_size, self.device, self.grammars)
            except (RuntimeError, IndexError, ValueError) as exc:  # bad settings fail this request only
                stream.error = f"{type(exc).__name__}: {exc}"
                stream._publish(None, "error")
                continue
            self._group.append(_Row(stream, state, budget))
            tokens += prompt
            longest = max(longest, prompt + budget)

    # 2. prefill ----------------------------------------------------------------------------------------
    def _prefill_step(self) -> None:
        # Dropping a cancelled row shifts the others' prefill-cache rows; that is safe because only a
        # group of one is ever prefilled across several passes (see _admit).
        group = []
        for r in self._group:
            if r.stream.cancelled.is_set():
                r.stream._publish(None, "abort")
            else:
                group.append(r)
        self._group = group
        if not group:
            return
        # A group of one may be longer than a chunk: it goes in pieces, one per iteration.
        chunks = [r.stream.prompt_ids[r.prefilled : r.prefilled + self.prefill_chunk] for r in group]
        starts = torch.tensor([r.prefilled for r in group], device=self.device)
        lengths = torch.tensor([len(c) for c in chunks], device=self.device)
        q_len = int(lengths.max())
        # input_ids: [n, Q] right-padded; positions: [n, Q]; mask: [n, 1, Q, end]
        input_ids = torch.zeros((len(group), q_len), dtype=torch.long, device=self.device)
        for i, chunk in enumerate(chunks):
            input_ids[i, : len(chunk)] = torch.tensor(chunk, device=self.device)
        hidden = self._forward(self._prefill_cache, 0, input_ids, starts, lengths)  # [n, Q, H]
        for i, (r, chunk) in enumerate(zip(group, chunks, strict=True)):
            if r.stream.params.prompt_logprobs is not None:
                self._score_prompt(r, hidden[i, : len(chunk)])
            r.prefilled += len(chunk)
        if any(r.prefilled < len(r.stream.prompt_ids) for r in group):
            return
        # Prompt done: the first token of each row comes from its last prompt position.
        last = hidden[torch.arange(len(group), device=self.device), lengths - 1]  # [n, H]
        tokens, logprobs = self._sample(last, group)
        first = len(self._rows)
        longest = max(len(r.stream.prompt_ids) for r in group)
        self.cache.ensure(first + len(group), longest)
        self.cache.copy_rows_from(self._prefill_cache, 0, first, len(group), longest)
        for r, token, logprob in zip(group, tokens, logprobs, strict=True):
            r.length = len(r.stream.prompt_ids)
            if r.budget == 0:  # max_tokens=0: the prompt was only scored
                r.finish = "length"
                r.stream._publish(None, "length")
            else:
                self._emit(r, token, logprob)
        self._rows.extend(group)
        self._group = []

    # 3. decode ----------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        rows = self._rows
        live = [r for r in rows if r.finish is None]
        if not live:
            return
        # Every row runs (slots are contiguous); finished ones are dropped right after, in _retire.
        input_ids = torch.tensor([[r.last_token] for r in rows], device=self.device)  # [B, 1]
        starts = torch.tensor([r.length for r in rows], device=self.device)  # [B] position of the new token
        ones = torch.ones(len(rows), dtype=torch.long, device=self.device)
        hidden = self._forward(self.cache, 0, input_ids, starts, ones)  # [B, 1, H]
        tokens, logprobs = self._sample(hidden[:, -1], rows)
        for r, token, logprob in zip(rows, tokens, logprobs, strict=True):
            if r.finish is None:
                r.length += 1
                self._emit(r, token, logprob)

    # 4. retire ----------------------------------------------------------------------------------------
    def _retire(self) -> None:
        i = 0
        while i < len(self._rows):
            r = self._rows[i]
            if r.finish is None and r.stream.cancelled.is_set():
                r.finish = "abort"
                r.stream._publish(None, "abort")
            if r.finish is None:
                i += 1
                continue
            last = len(self._rows) - 1
            if i != last:
                self.cache.move_row(last, i)
                self._rows[i] = self._rows[last]
            self._rows.pop()

    # -- shared pieces ------------------------------------------------------------------------------------
    def _forward(self, cache: SlotKVCache, first: int, input_ids, starts, lengths) -> torch.Tensor:
        positions, end = cache.prepare(first, starts, input_ids.shape[1])
        mask = attention_mask(starts, lengths, input_ids.shape[1], end, self.kv_dtype)
        out = self._base(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state

    def _sample(self, hidden: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = self.model.lm_head(hidden)  # [n, V]
        return next_tokens(logits, [r.state for r in rows], self.grammars, self.vocab_limit)

    def _score_prompt(self, row: _Row, hidden: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens this chunk's positions predict. hidden: [L, H]."""
        prompt = row.stream.prompt_ids
        start = row.prefilled
        if start == 0:
            row.scored = [None]  # the first token has no context to be scored in
        count = min(len(hidden), len(prompt) - 1 - start)  # the last position predicts the completion
        if count > 0:
            targets = torch.tensor(prompt[start + 1 : start + 1 + count], device=self.device)
            logits = self.model.lm_head(hidden[:count])  # [count, V]
            row.scored += logprobs_of(logits, targets, row.stream.params.prompt_logprobs)
        if start + len(hidden) >= len(prompt):
            row.stream._publish_prompt_logprobs(row.scored)

    def _emit(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> None:
        row.last_token = token
        if row.stream.cancelled.is_set():
            row.finish = "abort"
        elif row.state.error is not None:
            row.finish = "error"
            row.stream.error = row.state.error
        elif token in row.stream.params.stop_token_ids or row.state.grammar_done:
            row.finish = "stop"
        elif row.generated >= row.budget:
            row.finish = "length"
        row.stream._publish(None if row.finish in ("abort", "error") else token, row.finish, logprob)

    @staticmethod
    def _fail(rows: list[_Row], message: str) -> None:
        for r in rows:
            if r.finish is None:
                r.finish = "error"
                r.stream.error = message
                r.stream._publish(None, "error")
