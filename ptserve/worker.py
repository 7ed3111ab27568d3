"""The inference worker's side of a request, without LitServe: the model, the engine, and the messages
sent back to the HTTP process for each request (token text and typed outcomes, `ptserve.job`: no HTTP
statuses or wire envelopes here).

Several workers (devices x workers_per_device) may serve one HTTP process, and LitServe's request
queue hands a request to any of them. So cancellations and counters go through `Shared`, two
multiprocessing-manager dicts every process can see: the HTTP process marks a request id cancelled,
the worker that holds it cancels it at its next poll; each worker publishes its engine's counters (and,
once its engine has stopped for good, why: the HTTP process then answers 503 and the server exits
non-zero, so an orchestrator restarts it). Only the poll thread touches those dicts: a manager dict
is a round trip to another process, never made on an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any

from ptserve.config import Config
from ptserve.engine import loader
from ptserve.engine.detokenize import TextStream, TokenNames
from ptserve.engine.grammar import GrammarBackend
from ptserve.engine.sampling import SamplingParams
from ptserve.engine.scheduler import Engine, EngineDead, EngineFull, NeverFits
from ptserve.job import Job, failure
from ptserve.logs import request_id_var

logger = logging.getLogger(__name__)

SEED_SPACE = 2**64  # torch generators take 64-bit seeds
POLL_S = 0.05  # how often a worker looks for cancellations and publishes its counters
CANCEL_TTL_S = 60.0  # a cancellation no worker claimed (the request had ended) is dropped after this


def on_engine_thread(setup):
    """Run `setup()` (load the model, make the engine) on a new thread, then the engine's loop on that same
    thread; returns what setup returned. All of a worker's torch work then happens on one thread: the CPU
    build's OpenMP keeps a thread team per thread that runs parallel work, and once a second thread has one
    (the model loaded on the main thread, the engine stepping on another) every parallel region of the
    engine waits for its sleeping worker threads to wake: small ops took 8x as long (an index_select of 28
    blocks: 14 -> 122 us), whole decode steps of the bench model 1.8x (16 rows: 436 vs 798 tok/s)."""
    ready: concurrent.futures.Future = concurrent.futures.Future()

    def main() -> None:
        try:
            result = setup()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(result)
        result[1].run()

    threading.Thread(target=main, name="ptserve-engine", daemon=True).start()
    return ready.result()


@dataclasses.dataclass
class Shared:
    """Manager dicts shared by the HTTP process and every worker."""

    cancelled: Any  # request uid -> time.time() of the cancellation
    stats: Any  # worker name -> its engine's counters


class Worker:
    def __init__(self, config: Config, device: str | None, shared: Shared | None, workers_on_device: int = 1):
        self.config = config
        self.shared = shared
        self.name = f"{device or 'cpu'}/{os.getpid()}"
        server = config.server

        def setup() -> tuple[loader.LoadedModel, Engine]:
            loaded = loader.load(config, device)
            eos = list(loaded.eos_token_ids)
            grammars = GrammarBackend(loaded.tokenizer, loaded.model.config.vocab_size, eos)
            budget = loader.kv_cache_bytes(config, loaded.device)
            if server.kv_cache_gb is None and loaded.device.type == "cuda":
                budget //= workers_on_device  # replicas on one GPU share what is free
            engine = Engine(
                loaded.model,
                loaded.max_context_length,
                max_queued=server.max_queued_requests,
                max_seqs=server.max_concurrent_sequences,
                kv_budget_bytes=budget,
                grammars=grammars,
                vocab_limit=len(loaded.tokenizer),
                prefix_caching=server.prefix_caching,
                compile_decode=server.compile_decode,
                decode_graphs=server.cuda_graphs and loaded.device.type == "cuda",
                async_decode=server.async_scheduling and loaded.device.type == "cuda",
                prefill_chunk=server.prefill_chunk_tokens,  # None: the engine's choice for its device
            )
            return loaded, engine

        loaded, self.engine = on_engine_thread(setup)
        self.tokenizer = loaded.tokenizer
        self.names = TokenNames(loaded.tokenizer)
        self.eos_token_ids = tuple(loaded.eos_token_ids)
        logger.info(
            "engine %s: %d sequences at once, prompts in chunks of %d tokens, KV pool of %d blocks x %d tokens "
            "(%.2f GB), prefix caching %s, decoding passes %s",
            self.name,
            server.max_concurrent_sequences,
            self.engine.prefill_chunk,
            self.engine.blocks.usable,
            self.engine.block_size,
            self.engine.pool.nbytes / 1e9,
            "on" if server.prefix_caching else "off",
            self.engine.decode_mode,
        )
        self.streams: dict[str, list] = {}
        self.cancelled: set[str] = set()  # the shared dict's keys as of the last poll (read on the event loop)
        if shared is not None:
            threading.Thread(target=self._poll, name="ptserve-worker-poll", daemon=True).start()

    # -- requests ---------------------------------------------------------------------------------
    async def run(self, uid: str, job: Job):
        """The messages for one request (see the module docstring)."""
        request_id_var.set(job.request_id)
        if uid in self.cancelled:  # cancelled while it waited in the queue (the poll thread drops the entry)
            yield failure("cancelled", "cancelled before it started")
            return
        try:
            streams = self.engine.submit_many(self.sequences(job))
        except EngineDead as exc:
            yield failure("engine_failed", str(exc))
            return
        except EngineFull as exc:
            yield failure("queue_full", str(exc))
            return
        except NeverFits as exc:
            yield failure("never_fits", str(exc))
            return
        self.streams[uid] = streams
        yield {"accepted": True}
        choices = [
            _text_messages(i, s, TextStream(self.tokenizer, job.stop), self.names, cached=i % job.n == 0)
            for i, s in enumerate(streams)
        ]
        try:
            async for message in _merge(choices):
                yield message
                if "failure" in message:  # the request has failed: its other choices stop too (finally)
                    return
        finally:
            self.streams.pop(uid, None)
            for stream in streams:
                stream.cancel()  # no-op when finished; frees the slot if this task was cancelled

    def sequences(self, job: Job) -> list[tuple[list[int], SamplingParams]]:
        """n sequences per prompt. With a seed, sequence j samples with seed + j: the n choices differ,
        and the same request gives the same choices again."""
        stop_ids = () if job.ignore_eos else self.eos_token_ids
        out = []
        for prompt in job.prompts:
            for j in range(job.n):
                seed = (job.params.seed + j) % SEED_SPACE if job.params.seed is not None else None
                out.append((prompt, dataclasses.replace(job.params, seed=seed, stop_token_ids=stop_ids)))
        return out

    def stats(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "running": engine.running,
            "queued": engine.queued,
            "max_running": engine.max_seqs,
            "kv_budget_tokens": engine.kv_budget_tokens,
            "kv_reserved_tokens": engine.kv_reserved_tokens,
            "kv_pool_bytes": engine.pool.nbytes,
            "kv_blocks_total": engine.blocks.usable,
            "kv_blocks_used": engine.blocks.used,
            "kv_blocks_cached": engine.blocks.cached,
            "kv_pool_touched_bytes": engine.blocks.touched * engine.bytes_per_block,
            "prefix_cache_queries": engine.blocks.queries,
            "prefix_cache_hits": engine.blocks.hits,
            "preemptions": engine.preemptions,
            "dead": engine.dead,
            "time": time.time(),
        }

    # -- shared state -----------------------------------------------------------------------------
    def _poll(self) -> None:
        while True:
            try:
                self._claim_cancellations()
                self.shared.stats[self.name] = self.stats()
            except (OSError, EOFError, BrokenPipeError):  # the manager is gone: the server is stopping
                return
            except Exception:
                logger.exception("worker poll failed")
            time.sleep(POLL_S)

    def _claim_cancellations(self) -> None:
        now = time.time()
        cancelled = dict(self.shared.cancelled)  # one round trip
        self.cancelled = set(cancelled)
        for uid, when in cancelled.items():
            streams = self.streams.get(uid)
            if streams is not None:
                for stream in streams:
                    stream.cancel()
                self.shared.cancelled.pop(uid, None)
            elif now - when > CANCEL_TTL_S:
                self.shared.cancelled.pop(uid, None)


async def _merge(generators):
    """Interleave several async generators' items as they come (one: its items, without a task between)."""
    if len(generators) == 1:
        async with contextlib.aclosing(generators[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(gen):
        try:
            async for item in gen:
                await queue.put(item)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(g)) for g in generators]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
        for task in tasks:
            task.result()  # re-raise a pump's exception, if any
    finally:
        for task in tasks:
            task.cancel()


async def _text_messages(index: int, stream, text: TextStream, names: TokenNames, cached: bool = True):
    """One choice's engine outputs -> {"index", "text", "completion_tokens", "finish_reason"} messages, one
    per engine read, with "logprobs" (and, first, "prompt_logprobs") when the request asked, and first the
    prompt tokens the prefix cache provided ("cached_tokens", when `cached`: once per prompt, as the usage
    counts a prompt once however many choices it has)."""
    produced = 0
    first = True
    async for out in stream:
        if out.finish_reason == "error":
            yield failure("generation_failed", stream.error or "unknown error")
            return
        pieces, finish, records = [], None, []
        for k, token_id in enumerate(out.token_ids):
            produced += 1
            pieces.append(text.add(token_id))
            if out.logprobs is not None:
                lp = out.logprobs[k]
                records.append(names.record(token_id, lp.logprob, lp.top))
            if text.stopped:  # a stop string: tokens after it are dropped and not counted
                stream.cancel()
                finish = "stop"
                break
        if finish is None and out.finish_reason is not None:
            pieces.append(text.finish())
            finish = "stop" if text.stopped else out.finish_reason
        chunk = "".join(pieces)
        message: dict[str, Any] = {
            "index": index,
            "text": chunk,
            "completion_tokens": produced,
            "finish_reason": finish,
        }
        if text.stop_string is not None and finish:
            message["stop_string"] = text.stop_string  # Anthropic's stop_sequence names it
        if stream.params.logprobs is not None:
            message["logprobs"] = records
        if first and stream.prompt_logprobs is not None:
            message["prompt_logprobs"] = _prompt_records(stream, names)
        if first and cached:
            message["cached_tokens"] = stream.cached_tokens or 0
        if chunk or finish or records or "prompt_logprobs" in message:
            first = False
            yield message
        if finish:
            return


def _prompt_records(stream, names: TokenNames) -> list[dict[str, Any]]:
    records = []
    for token_id, lp in zip(stream.prompt_ids, stream.prompt_logprobs, strict=True):
        records.append(names.record(token_id, None) if lp is None else names.record(token_id, lp.logprob, lp.top))
    return records
