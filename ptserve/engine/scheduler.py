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
- Requests never mix: each row has its own blocks (shared ones hold equal prefixes, and are never
  written again), positions, sampling settings and RNG.
- `stream.cached_tokens`: how many prompt tokens the prefix cache provided (set before the first output).

One engine thread loops:
  1. schedule  every running row's next tokens (one when decoding, a chunk of the prompt when prefilling),
               then waiting requests while the KV pool's blocks, the batch width and the prefill token
               budget allow; a request first takes the longest prefix of its prompt already in the pool
               (prefix caching: the system prompt, earlier turns of a conversation, the n choices of one
               request). A running row that needs a block when none is free preempts the latest admitted
               rows: they wait, their blocks freed, and are recomputed when blocks free up.
  2. run       one forward pass over that ragged batch (paged.py: each row attends to its own tokens
               only), then a token for every row whose tokens are all computed
  3. retire    finished and cancelled rows leave; their blocks go back to the pool (or stay cached)
and sleeps on the queue when there is nothing to do (no busy polling). The pool is allocated once, at
start, from the KV budget (blocks.py, paged.py). With async decoding (a GPU's CUDA graphs,
`server.async_scheduling`), a decoding pass is launched before the tokens of the pass before it are read:
its rows' input ids that are still on the device are taken there, and the previous pass's tokens are read
and handed out while it runs (`Engine._run_ahead`); anything that needs them on the host first reads them.
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

from ptserve.engine import paged, triton_decode
from ptserve.engine.blocks import NULL_BLOCK, ROOT_KEY, BlockManager, block_keys
from ptserve.engine.grammar import GrammarBackend
from ptserve.engine.graphs import DecodeGraphs, host_syncs, on_device
from ptserve.engine.hostmem import keep_freed_memory, release_host_memory
from ptserve.engine.paged import KVPool, PagedBatch
from ptserve.engine.sampling import (
    RowState,
    SamplingParams,
    TokenLogprob,
    choose,
    count_drawn,
    hand_logprobs,
    logprobs_asked,
    logprobs_of,
    next_tokens,
)

logger = logging.getLogger(__name__)

# Prompt tokens per pass (decoding rows' tokens come on top; server.prefill_chunk_tokens), by device when not
# configured: on the CPU measured (README, "The engine"); on a GPU vLLM's API-server defaults
# (max_num_batched_tokens): 8192 on GPUs of 70 GiB or more other than the A100 (H100, H200, MI300X), else 2048.
# A GPU's passes are launch-bound at these sizes (an H100's eager decoding pass took ~40 ms whether it held 1
# row or 64), so larger chunks finish prompts in fewer passes at little cost to the rows decoding beside
# them. 8192 only where chunks after earlier tokens attend without a mask (the varlen kernel, or the two
# FlashAttention calls): the masked call's mask is [chunk, prefix + chunk] bools (8192 x 128k: 1 GiB a layer).
PREFILL_CHUNK_TOKENS = 512
GPU_PREFILL_CHUNK = 2048
BIG_GPU_PREFILL_CHUNK = 8192
BLOCK_SIZE = 16  # token positions per KV block (FlashAttention's paged kernels want a multiple of 16)
# An idle engine gives its passes' freed memory back (malloc_trim) once nothing has arrived for this long,
# not at once: the next pass would fault all of it in again, ~50 ms of a chat turn's TTFT at Phi-3.5's
# layer shape on the CPU (one conversation, bench/multiturn.py --shape phi35-4l --conversations 1: turn-8
# TTFT 408 ms releasing at once, 358 never releasing). A person's next turn comes within a minute or so.
IDLE_RELEASE_S = 60.0
DEFAULT_KV_BYTES = 1 << 30  # the pool when the caller gives no budget (the server always does)


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
    cached_tokens: int | None = None  # prompt tokens the prefix cache provided (set at admission)

    def cancel(self) -> None:
        self.cancelled.set()

    # Called on the engine thread.
    def _publish(self, token_id: int | None, finish_reason: str | None, logprob: TokenLogprob | None = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._receive, token_id, finish_reason, logprob)
        except RuntimeError:  # the reader's event loop is gone: nobody will read on
            self.cancelled.set()

    @staticmethod
    def _publish_all(items: list[tuple[GenerationStream, int | None, str | None, TokenLogprob | None]]) -> None:
        """A pass's outputs, one wake-up per reader's event loop (not one per row: each wake-up makes the
        engine thread wait for the GIL while that loop runs)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in items:
            by_loop.setdefault(item[0]._loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the readers' event loop is gone: nobody will read on
                for stream, *_ in batch:
                    stream.cancelled.set()

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
    """One sequence's state, from admission to retirement (and back to waiting, when preempted)."""

    stream: GenerationStream
    state: RowState  # sampling settings, RNG and the history penalties need
    budget: int  # tokens it may generate (max_tokens, capped by the context window)
    tokens: list[int]  # the prompt, then every token generated
    order: int  # admission order: the latest admitted are preempted first, readmitted last
    computed: int = 0  # tokens whose keys and values are in the pool
    blocks: list[int] = field(default_factory=list)  # its block table
    keys: list[bytes] = field(default_factory=list)  # prefix keys of its full blocks, as far as computed
    offered: int = 0  # blocks [0, offered) have been offered to the prefix cache
    decoding: bool = False  # it has sampled since it was (re)admitted
    scoring: bool = False  # its prompt's log-probabilities are asked and not yet published
    finish: str | None = None
    scored: list[TokenLogprob | None] = field(default_factory=list)  # prompt logprobs so far

    @property
    def generated(self) -> int:
        return self.state.generated

    @property
    def ahead(self) -> int:
        """Tokens drawn by passes in flight, not yet read (async decoding: `Engine._run_ahead`)."""
        return self.state.pending


class Engine:
    def __init__(
        self,
        model,
        max_context_length: int,
        max_queued: int = 256,
        max_seqs: int = 64,
        kv_budget_bytes: int | None = None,
        prefill_chunk: int | None = None,  # None: by device (PREFILL_CHUNK_TOKENS, GPU_PREFILL_CHUNK ...)
        grammars: GrammarBackend | None = None,
        vocab_limit: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = True,
        compile_decode: bool = False,
        decode_graphs: bool = False,
        async_decode: bool = False,
    ):
        self.model = model
        self.grammars = grammars
        self.vocab_limit = vocab_limit  # ids past the tokenizer's (no text) are never sampled
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # (for this thread; `run` sets the engine thread's)
        self.max_context_length = max_context_length
        self.max_queued = max_queued
        self.max_seqs = max_seqs
        cfg = model.config
        heads, kv_heads, head_dim = paged.attention_heads(cfg)
        self.kv_dtype = model.get_input_embeddings().weight.dtype
        if self.kv_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            self.kv_dtype = torch.bfloat16
        self.block_size = block_size
        layers = cfg.num_hidden_layers
        self.bytes_per_block = KVPool.bytes_per_block(layers, block_size, kv_heads, head_dim, self.kv_dtype)
        # The pool: the budget in whole blocks (no more than every sequence at full context needs, plus the
        # null block and the scratch block of padded decoding passes).
        padded = compile_decode or decode_graphs  # decoding passes at bucketed shapes
        most = max_seqs * -(-max_context_length // block_size) + 1 + int(padded)
        budget = kv_budget_bytes if kv_budget_bytes is not None else DEFAULT_KV_BYTES
        num_blocks = min(most, budget // self.bytes_per_block)
        keep_freed_memory()  # a pass's megabyte-sized temporaries reuse the heap, not fresh pages
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.pool = KVPool(layers, num_blocks, block_size, kv_heads, head_dim, self.kv_dtype, self.device)
        # what the padded rows of a bucketed decoding pass write and read: were it the null block,
        # re-zeroing that inside the compiled step would make inductor copy every layer's whole pool
        self._scratch = self.blocks.reserve() if padded else NULL_BLOCK
        self.pool.zero([self._scratch] if padded else [])
        self.kv_budget_tokens = self.blocks.usable * block_size
        self.watermark = max(1, self.blocks.usable // 100)  # blocks kept free for running rows when admitting
        half = self.kv_dtype in (torch.float16, torch.bfloat16)  # FlashAttention computes in 16 bits only
        self.use_varlen = self.device.type == "cuda" and half and _has_varlen()
        if self.use_varlen:
            self.use_varlen = paged.varlen_works(self.device, self.kv_dtype, block_size, kv_heads, heads, head_dim)
        if self.device.type == "cuda" and not self.use_varlen:
            self.pool.flash_chunks = paged.flash_chunks_work(self.device, self.kv_dtype, kv_heads, heads, head_dim)
            dims = (self.kv_dtype, block_size, kv_heads, heads, head_dim)
            # (not under torch.compile: its decode keeps the gathered path, which inductor fuses itself)
            self.pool.triton_decode = not compile_decode and triton_decode.works(self.device, *dims)
        unmasked = self.use_varlen or self.pool.flash_chunks  # chunks after earlier tokens attend without a mask
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(self.device, unmasked)
        paged.install(model)
        self._no_mask = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        # Passes of decoding rows only, at bucketed shapes (padded rows on the scratch block). On a GPU the
        # rows of such a pass share one gather + SDPA call (what `paged._groups` gives rows of equal width
        # within the bound `_bucketed_decode` keeps), with no Python loop over them.
        self._one_call = self.device.type == "cuda"
        self._min_bucket = 1
        self._decode = None
        if compile_decode and self.device.type == "cuda":
            # inductor's kernels in ptserve's own CUDA graphs (below), not torch's graph trees (through the
            # server they decoded at 93 ms a token, unexplained), compiled once for every bucket: rows and
            # blocks are symbolic (`_marked_decode`), from 2 of each (1 would be specialized: a compile more)
            self._decode = torch.compile(self._decode_step, fullgraph=True)
            self._min_bucket = 2
        elif compile_decode:  # on the CPU once per bucket, static shapes (the proof of a graph-safe pass)
            self._decode = torch.compile(self._decode_step, fullgraph=True, dynamic=False)
        self.vocab_size = cfg.vocab_size
        self._base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        # replayed from CUDA graphs captured per bucket (graphs.py; on the CPU, the tests: static buffers), the
        # eager pass or the compiled one on a GPU
        self._graphs = None
        if compile_decode and self.device.type == "cuda":
            self._graphs = self._start_graphs(self._marked_decode)
            if self._graphs is None:  # (said why) the compiled pass lives in its graphs on a GPU: eager passes
                self._decode = None
        elif decode_graphs and not compile_decode:
            self._graphs = self._start_graphs(self._decode_step)
        # Async decoding (`_run_ahead`): a decoding pass is launched before the previous one's tokens are read,
        # its input ids taken from those on the device, so that on a GPU the host's work of a step (reading and
        # handing out tokens, scheduling, launching) overlaps the device's pass instead of alternating with it.
        self._ahead = async_decode and self._graphs is not None and self._draws_without_waiting()
        self._inflight: _Flight | None = None  # the pass whose tokens are not yet read
        self._stalled: int | None = None  # free blocks when a waiting request last found too few
        self._waiting: queue.Queue[GenerationStream | None] = queue.Queue()
        self._held: deque[GenerationStream | _Row] = deque()  # taken off the queue, not yet admitted
        self._preempted: list[_Row] = []  # rows sent back to wait (their blocks freed), by admission order
        self._rows: list[_Row] = []  # admitted rows (prefilling or decoding), by admission order
        self._ids = itertools.count()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self._outbox: list = []  # this pass's outputs, published together at its end
        self._offered_now: set[int] = set()  # blocks offered to the prefix cache by the pass being run
        self.preemptions = 0
        self.dead: str | None = None  # why the engine stopped for good

    # -- public API ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the engine on a thread of its own."""
        threading.Thread(target=self.run, name="ptserve-engine", daemon=True).start()
        return self

    def run(self) -> None:
        """Run the engine on the calling thread until `shutdown()` (the worker calls it on the thread that
        loaded the model: see `worker.on_engine_thread`)."""
        self._thread = threading.current_thread()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the thread's own kernels and streams on the engine's GPU
        self._loop()

    def shutdown(self) -> None:
        self._stopping = True
        self._waiting.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[GenerationStream]:
        """Several sequences (a request's `n` choices, or its several prompts), queued together or not at all."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        for prompt_ids, params in jobs:
            need = min(len(prompt_ids) + params.max_tokens, self.max_context_length)
            if -(-need // self.block_size) > self.blocks.usable:
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
        return self._waiting.qsize() + len(self._held) + len(self._preempted)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def decode_mode(self) -> str:
        """How decoding passes run: "compiled", "from CUDA graphs", "compiled, from CUDA graphs", "from
        static buffers" (graphs' on the CPU) or "eager"."""
        graphs = None
        if self._graphs is not None:
            graphs = "from CUDA graphs" if self._graphs.capture else "from static buffers"
        if self._decode is not None:
            mode = f"compiled, {graphs}" if graphs else "compiled"
        else:
            mode = graphs or "eager"
        return f"{mode}, launched a pass ahead" if self._ahead else mode

    @property
    def kv_reserved_tokens(self) -> int:
        """Token positions in blocks held by sequences (a gauge read from another thread)."""
        return self.blocks.used * self.block_size

    # -- engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                idle = not (self._rows or self._held or self._preempted or self._inflight)
                # idle with memory to give back: wait IDLE_RELEASE_S for work first, then give it back
                arrived = self._take_arrivals(block=idle, timeout=IDLE_RELEASE_S if idle and self._busy else None)
                if arrived is None:
                    self._busy = False
                    release_host_memory()  # the pool stays; what the passes' activations left goes back
                    continue
                if not arrived:
                    break
                self._busy = True
                with torch.inference_mode():
                    if self._inflight is not None and not self._continues():
                        self._land()  # what comes next needs the tokens on the host
                        self._retire()
                    plan = self._schedule()
                    if plan:
                        self._run(plan)
                    elif self._inflight is not None:  # every row's last token was in flight
                        self._land()
                    self._retire()
        except BaseException as exc:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """The engine cannot go on: fail every request it holds or will be handed, at once."""
        self.dead = f"{type(exc).__name__}: {exc}"
        logger.critical("engine stopped for good: %s", self.dead, exc_info=exc)
        self._fail(self._rows + self._preempted, self.dead)
        self._rows, self._preempted = [], []
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._held.append(item)
        while self._held:
            stream = self._held.popleft()
            stream = stream.stream if isinstance(stream, _Row) else stream
            stream.error = self.dead
            stream._publish(None, "error")

    def _take_arrivals(self, block: bool, timeout: float | None = None) -> bool | None:
        """Move queued streams to `_held`; False on shutdown, None when `timeout` seconds passed with none."""
        try:
            item = self._waiting.get(block=block, timeout=timeout)
        except queue.Empty:
            return None if block else True
        try:
            while True:
                if item is None:
                    return False
                self._held.append(item)
                item = self._waiting.get_nowait()
        except queue.Empty:
            return True

    # 1. schedule ---------------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[_Row, int]]:
        """This pass's rows and how many new tokens each computes: every running row first (one token
        each when decoding, a chunk of its prompt when prefilling), then waiting rows while blocks, the
        width and the prefill token budget allow. A running row that needs a block when none is free
        preempts the latest admitted rows (they wait, blocks freed, and are recomputed later)."""
        prefill_budget = self.prefill_chunk
        plan: list[tuple[_Row, int]] = []
        preempted = False
        self._offered_now = set()  # blocks published to the prefix cache for this pass
        i = 0
        while i < len(self._rows):
            row = self._rows[i]
            i += 1
            if row.finish is None and row.stream.cancelled.is_set():
                self._finish(row, "abort")
                self.blocks.release(row.blocks)  # now, not at retirement: a later row may need them
                row.blocks = []
            if row.finish is not None:
                continue
            pending = len(row.tokens) + row.ahead - row.computed
            n = 1 if pending == 1 else min(pending, prefill_budget)
            if n == 0 or (row.ahead and row.generated + row.ahead >= row.budget):
                continue  # (its last token is in flight: nothing more to compute)
            while not self._grow(row, row.computed + n):
                victim = next(r for r in reversed(self._rows) if r.finish is None)
                self._preempt(victim)
                preempted = True
                if victim is row:
                    break
            if row in self._rows:
                if pending > 1:
                    prefill_budget -= n
                plan.append((row, n))
                self._offer(row, n)
        if not preempted:
            self._admit(plan, prefill_budget)
        return plan

    def _admit(self, plan: list[tuple[_Row, int]], prefill_budget: int) -> None:
        self._stalled = None
        while prefill_budget > 0 and len(self._rows) < self.max_seqs:
            row = self._next_waiting()
            if row is None:
                return
            computed, hit = 0, []
            if not row.scoring:
                # keys of the full blocks before the last token (always computed), kept while it waits
                known = (len(row.tokens) - 1) // self.block_size
                if len(row.keys) < known:
                    start = row.keys[-1] if row.keys else ROOT_KEY
                    row.keys += block_keys(row.tokens[: known * self.block_size], self.block_size, start, len(row.keys))
                hit = self.blocks.lookup(row.keys[:known])
                computed = len(hit) * self.block_size
            pending = len(row.tokens) - computed
            if prefill_budget < pending <= self.prefill_chunk and prefill_budget < self.prefill_chunk:
                # A prompt that fits one pass is not split over two when this pass already prefills
                # another: it goes first in the next, whole. Requests arriving together then finish
                # one per pass instead of sharing passes (4 chat turns of ~280 new tokens: first tokens
                # after 1, 2, 3 and 4 short passes, not 1, 2, 2 and 3 full ones).
                self.blocks.release(hit)
                return
            n = min(pending, prefill_budget)
            need = -(-(computed + n) // self.block_size) - len(hit)
            # keep a few blocks for running rows to grow into; with none running, the whole pool may go
            reserve = self.watermark if self._rows else 0
            fresh = self.blocks.allocate(need) if self.blocks.free - need >= reserve else None
            if fresh is None:
                self.blocks.release(hit)
                self._stalled = self.blocks.free  # (passes may go ahead until more blocks are free)
                return  # it waits for blocks to be freed
            self._take_waiting(row)
            if row.stream.cached_tokens is None:  # first admission: what the prefix cache gave its prompt
                row.stream.cached_tokens = computed
                self.blocks.count_query(len(row.tokens), computed)
            row.blocks, row.computed, row.offered = hit + fresh, computed, len(hit)
            self._rows.append(row)
            plan.append((row, n))
            self._offer(row, n)
            prefill_budget -= n

    def _next_waiting(self) -> _Row | None:
        """The first waiting row (preempted ones first), made for a new stream; None when none waits."""
        while self._preempted or self._held:
            if self._preempted:
                row = self._preempted[0]
                if row.stream.cancelled.is_set():
                    self._preempted.pop(0)
                    self._finish(row, "abort")
                    continue
                return row
            item = self._held[0]
            stream = item.stream if isinstance(item, _Row) else item
            if stream.cancelled.is_set():
                self._held.popleft()
                stream._publish(None, "abort")
                continue
            if isinstance(item, _Row):  # made before, still waiting for blocks
                return item
            prompt = len(stream.prompt_ids)
            budget = min(stream.params.max_tokens, self.max_context_length - prompt)
            try:
                state = RowState.create(stream.params, stream.prompt_ids, self.vocab_size, self.device, self.grammars)
            except (RuntimeError, IndexError, ValueError) as exc:  # bad settings fail this request only
                self._held.popleft()
                stream.error = f"{type(exc).__name__}: {exc}"
                stream._publish(None, "error")
                continue
            row = _Row(stream, state, budget, list(stream.prompt_ids), next(self._order))
            row.scoring = stream.params.prompt_logprobs is not None
            self._held[0] = row  # made once, even if it has to wait for blocks
            return row
        return None

    def _take_waiting(self, row: _Row) -> None:
        if self._preempted and self._preempted[0] is row:
            self._preempted.pop(0)
        else:
            self._held.popleft()

    def _grow(self, row: _Row, end: int) -> bool:
        """Blocks for `row` to hold `end` tokens; False (nothing taken) when not enough are free."""
        need = -(-end // self.block_size) - len(row.blocks)
        if need <= 0:
            return True
        fresh = self.blocks.allocate(need)
        if fresh is None:
            return False
        row.blocks += fresh
        return True

    def _preempt(self, row: _Row) -> None:
        """Send `row` back to wait: its blocks are freed (cached ones may serve its recomputation)."""
        logger.info("KV pool full: request %d preempted at %d tokens", row.stream.request_id, len(row.tokens))
        self.preemptions += 1
        self._rows.remove(row)
        self.blocks.release(row.blocks)
        row.blocks, row.computed, row.offered, row.decoding = [], 0, 0, False
        self._preempted.append(row)
        self._preempted.sort(key=lambda r: r.order)

    def _offer(self, row: _Row, n: int, now: bool = True) -> None:
        """Publish the blocks that `row`'s next `n` tokens fill to the prefix cache, as soon as the row is
        planned: a row planned after it in the same pass may read them (every key of a pass is written
        before any row attends). Only blocks whose tokens are all known on the host: one completed by a
        token in flight is published when that token is read (`_land`; `now` False: not this pass's)."""
        bs = self.block_size
        full = min((row.computed + n) // bs, len(row.tokens) // bs)
        if not self.blocks.prefix_caching or full <= row.offered:
            return
        if len(row.keys) < full:
            start = row.keys[-1] if row.keys else ROOT_KEY
            row.keys += block_keys(row.tokens[: full * bs], bs, start, len(row.keys))
        for b in range(row.offered, full):
            if self.blocks.register(row.blocks[b], row.keys[b]) and now:
                self._offered_now.add(row.blocks[b])
        row.offered = full

    # 2. run --------------------------------------------------------------------------------------------
    def _run(self, plan: list[tuple[_Row, int]]) -> None:
        """One forward pass over the plan, then a token for every row whose tokens are all computed. A
        failed pass fails the rows that were joining (prefilling) and is retried for the decoding ones;
        one that fails again, or held only decoding rows, fails them all. A fatal error propagates."""
        if self._ahead and all(r.decoding and n == 1 for r, n in plan):
            self._run_ahead(plan)
            return
        if self._inflight is not None:  # (the loop lands it before such a plan; kept safe here too)
            self._land()
            plan = [(r, n) for r, n in plan if r.finish is None]
            if not plan:
                return
        self._run_now(plan)

    def _run_now(self, plan: list[tuple[_Row, int]]) -> None:
        self.pool.zero(self.blocks.take_fresh())
        hidden, exc = self._attempt(self._pass, plan)
        if exc is not None:
            decoding = [(r, n) for r, n in plan if r.decoding]
            joining = [r for r, _ in plan if not r.decoding]
            retry = decoding if decoding and joining else []
            self._fail_rows(joining if retry else [r for r, _ in plan], _describe(exc))
            if not retry:
                return
            plan = retry
            hidden, exc = self._attempt(self._pass, plan)
            if exc is not None:
                self._fail_rows([r for r, _ in plan], _describe(exc))
                return
        _, exc = self._attempt(self._advance, plan, hidden)
        if exc is not None:
            self._fail_rows([r for r, _ in plan if r.finish is None], _describe(exc))

    def _run_ahead(self, plan: list[tuple[_Row, int]]) -> None:
        """A decoding pass launched before the previous pass's tokens are read: rows whose input token is
        still in flight take it from the device (`_bucketed_decode`), the pass's own tokens are drawn and
        left there for the next pass, and only then are the previous pass's tokens read and handed out,
        while this pass runs. A row that stopped on the token read here had one more token computed in
        this pass: it is dropped when read. Passes from static buffers only (their inputs come in one copy
        from pinned memory: no copy that waits for the device). Where a row follows a grammar, whose mask
        depends on the token in flight, the previous pass's tokens are read first (while this pass's
        forward runs: the masks are made meanwhile) and this pass's tokens drawn after (`_draw_after`)."""
        flight = self._inflight
        rows = [r for r, _ in plan]
        masked = any(r.state.matcher is not None for r in rows)
        self.pool.zero(self.blocks.take_fresh())
        try:
            hidden = self._bucketed_decode(plan, flight)
            launched = None if hidden is None or masked else _Flight(rows, *self._choose(hidden, rows))
        except Exception as exc:
            if is_fatal(exc):
                raise
            logger.exception("engine step failed")
            self._recover(exc)
            if flight is not None:
                self._land()
            self._fail_rows([r for r in rows if r.finish is None], _describe(exc))
            return
        if hidden is None:  # this pass goes eager (a capture failed, or a GPU's gather bound): ids on the host
            if flight is not None:
                self._land()
            plan = [(r, n) for r, n in plan if r.finish is None]
            if plan:
                self._run_now(plan)
            return
        for row in rows:
            row.computed += 1
        if masked:
            self._draw_after(flight, rows, hidden)
            return
        self._inflight = launched
        if flight is not None:
            self._land(flight)

    def _draw_after(self, flight: _Flight | None, rows: list[_Row], hidden: torch.Tensor) -> None:
        """The tokens of a pass launched with grammar rows: the pass in flight before it read first (the
        grammars consume its tokens), then this pass's drawn, masked, for the rows still running (one that
        stopped on the token read computed a token more, dropped)."""
        if flight is not None:
            self._inflight = None
            self._land(flight)
        live = [i for i, r in enumerate(rows) if r.finish is None]
        if not live:
            return
        if len(live) < len(rows):
            hidden = hidden.index_select(0, on_device(live, hidden.device))
            rows = [rows[i] for i in live]
        launched, exc = self._attempt(self._choose, hidden, rows)
        if exc is not None:
            self._fail_rows([r for r in rows if r.finish is None], _describe(exc))
            return
        self._inflight = _Flight(rows, *launched)

    def _continues(self) -> bool:
        """Whether the next pass may be launched before the pass in flight is read: every running row is in
        it, no waiting request could join now (it would need a prefill pass, whose ids are read on the host:
        one that found too few blocks waits until more are free), and the rows that need a block to go on
        find one (no preemption)."""
        waiting = (self._held or self._preempted) and len(self._rows) < self.max_seqs
        if waiting and (self._stalled is None or self.blocks.free > self._stalled):
            return False
        if not self._ahead:
            return False
        need = 0
        for row in self._rows:
            if row.finish is not None:
                continue
            if not row.ahead:
                return False
            if row.generated + row.ahead < row.budget:
                need += max(0, -(-(row.computed + 1) // self.block_size) - len(row.blocks))
        return need <= self.blocks.free

    def _land(self, flight: _Flight | None = None) -> None:
        """Read the tokens of a pass in flight (`_inflight` by default: waiting for that pass only) and hand
        them out as `_advance` does; a row finished since it was launched (it stopped on the token before,
        or was cancelled) drops its token. A failure there fails the pass's rows (as `_advance`'s)."""
        if flight is None:
            flight, self._inflight = self._inflight, None
        _, exc = self._attempt(self._hand_out, flight)
        if exc is not None:
            self._fail_rows([r for r in flight.rows if r.finish is None], _describe(exc))

    def _hand_out(self, flight: _Flight) -> None:
        tokens, asked = flight.read()
        states = [r.state for r in flight.rows]
        logprobs = hand_logprobs(states, *asked) if asked else [None] * len(tokens)
        for row, token, logprob in zip(flight.rows, tokens, logprobs, strict=True):
            if row.finish is not None:
                row.state.pending -= 1  # (dropped)
                continue
            row.state.record(token, drawn=True)  # (penalties' counts: `_choose` did)
            row.tokens.append(token)
            self._emit(row, token, logprob)
            self._offer(row, 0, now=False)  # a block this token completes (its keys: a pass already launched)
        GenerationStream._publish_all(self._outbox)
        self._outbox = []

    def _attempt(self, step, *args):
        """(step(*args), None), or (None, the exception) once a non-fatal failure is logged and the device
        recovered from it; a fatal one propagates (the engine dies)."""
        try:
            return step(*args), None
        except Exception as exc:
            if is_fatal(exc):
                raise
            logger.exception("engine step failed")
            self._recover(exc)
            return None, exc

    def _pass(self, plan: list[tuple[_Row, int]]) -> torch.Tensor:
        padded = self._decode is not None or self._graphs is not None
        if padded and all(r.decoding and n == 1 for r, n in plan):
            hidden = self._bucketed_decode(plan)
            if hidden is not None:
                return hidden
        ids, positions = [], []
        for row, n in plan:
            ids += row.tokens[row.computed : row.computed + n]
            positions += range(row.computed, row.computed + n)
        batch = PagedBatch.build(self.pool, [(r.computed, n, r.blocks) for r, n in plan], self.use_varlen)
        prefill = any(not r.decoding for r, _ in plan)
        input_ids = torch.tensor([ids], device=self.device)
        position_ids = torch.tensor([positions], device=self.device)
        return self._forward(batch, input_ids, position_ids, prefill)[0]  # [T, H]

    def _forward(self, batch: PagedBatch, input_ids, position_ids, prefill: bool) -> torch.Tensor:
        return self._hidden(batch, input_ids, position_ids)

    def _hidden(self, batch: PagedBatch, input_ids, position_ids) -> torch.Tensor:
        """The model's last hidden states for a pass laid out by `batch`: [1, T] ids -> [1, T, H]."""
        out = self._base(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=self._no_mask,
            use_cache=False,
            paged=batch,
        )
        return out.last_hidden_state

    def _bucketed_decode(self, plan: list[tuple[_Row, int]], flight: _Flight | None = None) -> torch.Tensor | None:
        """A pass of decoding rows padded to a bucket of rows and of blocks per row (powers of two), so the
        compiled step or the graphs see a few fixed shapes: padded rows write to the scratch block and read
        that one token (what they compute is dropped; real rows never read past their own length nor the
        scratch block). None (an eager pass instead) where a GPU would gather more than
        paged.GPU_GATHER_TOKENS a layer for it (neither the varlen kernel nor the Triton one reads the
        pool in place): every row of a bucket reads its width. A row whose input token is in `flight` (not
        yet read) takes it from the device."""
        bs, rows = self.block_size, len(plan)
        width = max(self._min_bucket, _bucket(max(r.computed // bs + 1 for r, _ in plan)))
        size = max(self._min_bucket, _bucket(rows))
        gathered = self.device.type == "cuda" and not (self.use_varlen or self.pool.triton_decode)
        if gathered and size * width * bs > paged.GPU_GATHER_TOKENS:
            return None
        known = [flight is None or r.computed < len(r.tokens) for r, _ in plan]
        ids = [r.tokens[r.computed] if k else 0 for (r, _), k in zip(plan, known, strict=True)] + [0] * (size - rows)
        positions = [r.computed for r, _ in plan] + [0] * (size - rows)
        pad = size - rows
        slots = [r.blocks[r.computed // bs] * bs + r.computed % bs for r, _ in plan] + [self._scratch * bs] * pad
        tables = [r.blocks[: r.computed // bs + 1] for r, _ in plan] + [[self._scratch]] * pad
        tables = [t + [NULL_BLOCK] * (width - len(t)) for t in tables]
        lens = [r.computed + 1 for r, _ in plan] + [1] * (size - rows)
        if self._graphs is not None:
            feed = None
            if not all(known):
                sources = [-1 if k else flight.index[id(r)] for (r, _), k in zip(plan, known, strict=True)]
                feed = (flight.tokens, sources + [-1] * pad)
            hidden = self._graphs(ids, positions, slots, lens, tables, feed)
            if hidden is None:  # a capture failed (only on a GPU; DecodeGraphs said why): eager passes from now
                self._graphs = self._decode = None  # on (compiled without its graphs, fresh tensors would recompile)
                self._ahead = False
                return None
            return hidden[:rows]
        device = self.device
        hidden = self._decode(
            torch.tensor([ids], device=device),
            torch.tensor([positions], device=device),
            torch.tensor(slots, device=device),
            torch.tensor(tables, device=device),
            torch.tensor(lens, device=device),
        )
        return hidden[:rows]

    def _decode_step(self, input_ids, position_ids, slots, tables, lens) -> torch.Tensor:
        """One decoding pass from tensors only (what torch.compile traces): [1, B] ids and positions, [B]
        slots, [B, W] block tables, [B] lengths -> hidden states [B, H]."""
        batch = PagedBatch.decode(self.pool, slots, tables, lens, self.use_varlen, self._one_call)
        return self._hidden(batch, input_ids, position_ids)[0]

    def _marked_decode(self, input_ids, position_ids, slots, tables, lens) -> torch.Tensor:
        """The compiled decoding pass with its rows and blocks dimensions symbolic: one compile serves every
        bucket (of 2 rows and 2 blocks or more)."""
        for t, dim in ((input_ids, 1), (position_ids, 1), (slots, 0), (tables, 0), (tables, 1), (lens, 0)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        return self._decode(input_ids, position_ids, slots, tables, lens)

    def _start_graphs(self, step) -> DecodeGraphs | None:
        """Decoding passes of `step` from static buffers (CUDA graphs on CUDA), once a pass of padded rows
        (they write and read the scratch block only) is found to hold no host sync, and its graph, captured
        from one token and replayed for another, gives what `step` itself gives for the other (a graph that
        missed the pass's kernels would give the first's again); else None, with a warning saying why.
        (`step` against the eager pass: the tests; compiled, bf16 rounds elsewhere.)"""
        graphs = DecodeGraphs(step, self.device, capture=self.device.type == "cuda")
        n = self._min_bucket
        slots, lens = [self._scratch * self.block_size] * n, [1] * n
        tables = [[self._scratch] + [NULL_BLOCK] * (n - 1)] * n

        ids, positions = [[0] * n], [[0] * n]
        args = [torch.tensor(x, device=self.device) for x in (ids, positions, slots, tables, lens)]
        try:
            with torch.inference_mode():
                syncs = host_syncs(self._decode_step, *args)
                if syncs:
                    found = ", ".join(sorted(set(syncs)))
                    logger.warning("decoding passes stay eager: a graph cannot hold their %s", found)
                    return None
                replayed = [graphs([token] * n, [0] * n, slots, lens, tables) for token in (0, 1)][-1]
                if replayed is None:  # the capture failed (DecodeGraphs said why)
                    return None
                direct = step(*graphs.buckets[(n, n)].views)  # the same inputs, not from the graph
                agree = torch.allclose(replayed.float(), direct.float(), atol=2e-2, rtol=2e-2)
        except Exception as exc:
            logger.warning("decoding passes stay eager: their graph failed (%s)", _describe(exc))
            return None
        if not agree:
            logger.warning("decoding passes stay eager: the graph's replay differs from the pass it captured")
            return None
        return graphs

    def _draws_without_waiting(self) -> bool:
        """Whether drawing a pass's tokens (`_choose`: lm_head, sampling, penalties' counts and logprobs;
        greedy, sampled (seed, top-k, top-p, min-p), penalized and grammar rows (min_tokens too), together
        and apart) leaves the host free, as passes launched ahead need (a copy or a read that waits would
        make each launch wait for the pass before it); else False, with a warning saying what waits.
        Checked once, at start."""
        hidden = torch.zeros(4, self.model.config.hidden_size, dtype=self.kv_dtype, device=self.device)
        settings = (
            SamplingParams(1, temperature=0.0),
            SamplingParams(1, temperature=0.8, top_p=0.9, top_k=5, min_p=0.01, seed=0),
            SamplingParams(
                1,
                frequency_penalty=0.5,
                presence_penalty=0.5,
                repetition_penalty=1.2,
                logit_bias=((7, 1.0),),
                logprobs=2,
            ),
        )
        grammar = SamplingParams(1, temperature=0.0, min_tokens=2, stop_token_ids=(0,), grammar="start: /[a-z]+/")

        def draw(*states: RowState) -> None:
            logits = self.model.lm_head(hidden[: len(states)])
            tokens = choose(logits, list(states), self.grammars, self.vocab_limit)
            count_drawn(tokens, list(states))
            logprobs_asked(logits, tokens, list(states))

        def draws(greedy: RowState, sampled: RowState, penalized: RowState, *constrained: RowState) -> None:
            draw(greedy, sampled, penalized, *constrained)
            draw(sampled)
            if constrained:
                draw(*constrained)

        try:
            with torch.inference_mode():
                states = [RowState.create(p, [0], self.vocab_size, self.device) for p in settings]
                if self.grammars is not None:  # (made here, not checked: a row's set-up is not a pass's work)
                    states.append(RowState.create(grammar, [0], self.vocab_size, self.device, self.grammars))
                waits = host_syncs(draws, *states, pinned_ok=True)
        except Exception as exc:
            waits = [_describe(exc)]
        if waits:
            found = ", ".join(sorted(set(waits)))
            logger.warning("decoding passes are read one by one: drawing their tokens waits for the device (%s)", found)
        return not waits

    def _advance(self, plan: list[tuple[_Row, int]], hidden: torch.Tensor) -> None:
        offset = 0
        ready, last = [], []
        for row, n in plan:
            if row.scoring:
                self._score_prompt(row, hidden[offset : offset + n])
            row.computed += n
            offset += n
            if row.computed < len(row.tokens):
                continue
            if row.budget == 0:  # max_tokens=0: the prompt was only scored
                self._finish(row, "length")
                continue
            ready.append(row)
            last.append(offset - 1)
        if not ready:
            return
        # (`last` ascends: as many as the pass's tokens is all of them, as a decoding pass has it; a list index
        # would be one more host-to-device copy, which on a GPU first waits for the pass)
        tokens, logprobs = self._sample(hidden if len(last) == len(hidden) else hidden[last], ready)
        for row, token, logprob in zip(ready, tokens, logprobs, strict=True):
            row.decoding = True
            row.tokens.append(token)
            self._emit(row, token, logprob)
        GenerationStream._publish_all(self._outbox)
        self._outbox = []

    def _recover(self, exc: Exception) -> None:
        if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # 3. retire ----------------------------------------------------------------------------------------
    def _retire(self) -> None:
        kept = []
        for r in self._rows:
            if r.finish is None and r.stream.cancelled.is_set():
                self._finish(r, "abort")
            if r.finish is None:
                kept.append(r)
            else:
                self.blocks.release(r.blocks)
                r.blocks = []
        self._rows = kept

    # -- shared pieces ------------------------------------------------------------------------------------
    def _sample(self, hidden: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = self.model.lm_head(hidden)  # [n, V]
        return next_tokens(logits, [r.state for r in rows], self.grammars, self.vocab_limit)

    def _choose(self, hidden: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The rows' next tokens and the logprobs asked (`sampling.logprobs_asked`), left on the device (rows
        with a grammar: masked by the tokens read so far, which must be all of theirs), each token counted
        there for its penalties (the next pass's draw, launched before these are read, needs them)."""
        states = [r.state for r in rows]
        logits = self.model.lm_head(hidden)
        tokens = choose(logits, states, self.grammars, self.vocab_limit)
        count_drawn(tokens, states)
        return tokens, logprobs_asked(logits, tokens, states)

    def _score_prompt(self, row: _Row, hidden: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens this chunk's positions predict. hidden: [L, H]."""
        prompt = row.stream.prompt_ids
        start = row.computed
        if start == 0:
            row.scored = [None]  # the first token has no context to be scored in
        count = min(len(hidden), len(prompt) - 1 - start)  # the last position predicts the completion
        if count > 0:
            targets = torch.tensor(prompt[start + 1 : start + 1 + count], device=self.device)
            logits = self.model.lm_head(hidden[:count])  # [count, V]
            row.scored += logprobs_of(logits, targets, row.stream.params.prompt_logprobs)
        if start + len(hidden) >= len(prompt):
            row.stream._publish_prompt_logprobs(row.scored)
            row.scoring = False

    def _emit(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> None:
        if row.stream.cancelled.is_set():
            row.finish = "abort"
        elif row.state.error is not None:
            row.finish = "error"
            row.stream.error = row.state.error
        elif token in row.stream.params.stop_token_ids or row.state.grammar_done:
            row.finish = "stop"
        elif row.generated >= row.budget:
            row.finish = "length"
        self._outbox.append((row.stream, None if row.finish in ("abort", "error") else token, row.finish, logprob))

    @staticmethod
    def _finish(row: _Row, reason: str) -> None:
        row.finish = reason
        row.stream._publish(None, reason)

    def _fail_rows(self, rows: list[_Row], message: str) -> None:
        """Rows of a failed pass: failed, their blocks freed, and what was offered the prefix cache for
        this pass forgotten once no row holds it (it may not have been written; rows that shared it in the
        same pass fail with it, the last one to let go forgets it). Blocks cached by earlier passes stay."""
        self._fail(rows, message)
        for r in rows:
            for block in r.blocks:
                if block in self._offered_now and self.blocks.refs[block] == 1:
                    self.blocks.unregister(block)
            if r in self._rows:
                self._rows.remove(r)
            self.blocks.release(r.blocks)
            r.blocks = []

    @staticmethod
    def _fail(rows: list[_Row], message: str) -> None:
        for r in rows:
            if r.finish is None:
                r.finish = "error"
                r.stream.error = message
                r.stream._publish(None, "error")


class _Flight:
    """A decoding pass whose sampled tokens are not yet read (async decoding): the next pass takes them as
    input ids on the device; on CUDA they (and the logprobs asked, `sampling.logprobs_asked`) are also
    copied to pinned host memory as soon as drawn, so that reading them waits for this pass only, not for
    the one launched after it."""

    def __init__(self, rows: list[_Row], tokens: torch.Tensor, logprobs: tuple[torch.Tensor, ...] = ()):
        self.rows = rows
        self.tokens = tokens  # [len(rows)] long, on the device
        self.index = {id(r): i for i, r in enumerate(rows)}
        self._done = None
        self._host = (tokens, *logprobs)
        if tokens.device.type == "cuda":
            self._host = tuple(torch.empty_like(t, device="cpu", pin_memory=True) for t in self._host)
            for host, t in zip(self._host, (tokens, *logprobs), strict=True):
                host.copy_(t, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(tokens.device))

    def read(self) -> tuple[list[int], list]:
        """The tokens, and the logprobs asked, read back (`sampling.hand_logprobs`' values; [] if none)."""
        if self._done is not None:
            self._done.synchronize()
        tokens, *logprobs = (t.tolist() for t in self._host)
        return tokens, logprobs


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


def _deliver(items) -> None:
    """On the readers' event loop: hand each stream its output."""
    for stream, token_id, finish_reason, logprob in items:
        stream._receive(token_id, finish_reason, logprob)


def default_prefill_chunk(device: torch.device, unmasked_chunks: bool) -> int:
    """Prompt tokens per pass when server.prefill_chunk_tokens is null (see PREFILL_CHUNK_TOKENS)."""
    if device.type != "cuda":
        return PREFILL_CHUNK_TOKENS
    props = torch.cuda.get_device_properties(device)
    big = props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower()
    return BIG_GPU_PREFILL_CHUNK if big and unmasked_chunks else GPU_PREFILL_CHUNK


def _has_varlen() -> bool:
    """FlashAttention's varlen kernel with a paged pool (torch 2.13: block_table, seqused_k, num_splits);
    older torch builds lack the paged arguments and take the SDPA path."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    params = inspect.signature(varlen_attn).parameters
    return all(name in params for name in ("block_table", "seqused_k", "num_splits"))
