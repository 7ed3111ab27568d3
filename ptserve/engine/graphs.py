"""Decoding passes replayed from CUDA graphs.

An eager decoding pass is launch-bound on a GPU: at Phi-3.5's shape on an H100 it is ~1,400 kernel
launches from Python (transformers' layer code, ~45 a layer) taking ~40 ms, while the GPU is busy ~11 ms
of it at 1 row (bench/engine_step.py, torch 2.11). A CUDA graph records a pass's kernels once and
replays them with one launch, as vLLM and SGLang do for their decoding steps.

A graph replays fixed shapes at fixed addresses, so a pass runs on static buffers: the engine pads its
decoding rows to a bucket (rows and blocks per row, powers of two; padded rows write and read the scratch
block: `Engine._bucketed_decode`), packs the bucket's ids, positions, slots, lengths and block tables into
one host buffer, copies it to the bucket's device buffer in one transfer and replays the bucket's graph,
whose output tensor the next call overwrites. Each bucket's graph is captured the first time it is met
(a pass on a side stream to warm up, the capture, then the replay: about three eager passes once); all of
them share one memory pool, which is safe because they replay one at a time on one stream and each keeps
its output alive.

A graph cannot hold a pass that waits for the device (`.item()`, a data-dependent shape) or copies host
data to it: `host_syncs` lists the operations of a pass that would, and the engine checks its pass with it
before using graphs; the same check runs on the CPU in the tests. It sees what goes through torch's
dispatcher (not `torch.tensor(data, device=...)`, which copies below it): the engine then also captures one
bucket and compares its replay with the eager pass, and a capture that fails leaves passes eager.

Without CUDA (the tests on the CPU) `DecodeGraphs` runs the pass eagerly on the same static buffers and
copies its result into the bucket's output buffer: the same contract without the capture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger(__name__)

aten = torch.ops.aten

# operations that make the host wait for the device (their result is read on the host or sizes a tensor)
SYNCING = {
    aten.item,  # .item(), int(t), bool(t) (under inference mode; else as the next one)
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
}


class _SyncCheck(TorchDispatchMode):
    def __init__(self, pinned_ok: bool = False):
        super().__init__()
        self.found: list[str] = []
        self.pinned_ok = pinned_ok

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        name = str(packet).removeprefix("aten.")
        if packet in SYNCING:
            self.found.append("item" if packet is aten._local_scalar_dense else name)
        elif packet is aten.repeat_interleave and func._overloadname != "self_int":
            if kwargs.get("output_size") is None:
                self.found.append(name)  # counts in a tensor size its output
        elif packet in INDEXING and any(_is_mask(i) for i in args[1]):
            self.found.append(f"{name} by a boolean mask")  # its True count sizes the result
        elif packet is aten.copy_ and self._waits(args[1], args[0], args[2] if len(args) > 2 else kwargs):
            self.found.append(f"{name} {args[1].device.type}->{args[0].device.type}")
        out = func(*args, **kwargs)
        if packet in (aten._to_copy, aten.to) and isinstance(out, torch.Tensor) and self._waits(args[0], out, kwargs):
            self.found.append(f"to {args[0].device.type}->{out.device.type}")
        return out

    def _waits(self, source: torch.Tensor, dest: torch.Tensor, non_blocking) -> bool:
        """A copy between the host and a device; with `pinned_ok`, not one that is non-blocking with its host
        side pinned (the host goes on at once)."""
        if not _crosses(source, dest):
            return False
        if isinstance(non_blocking, dict):
            non_blocking = non_blocking.get("non_blocking", False)
        host = source if source.device.type == "cpu" else dest
        return not (self.pinned_ok and non_blocking and host.is_pinned())


INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _crosses(source: torch.Tensor, dest: torch.Tensor) -> bool:
    """A copy between the host and a device (0-dim ones too: a device scalar read back waits for the device)."""
    return (source.device.type == "cpu") != (dest.device.type == "cpu")


def on_device(values: list, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A small host list as a tensor on `device`; on CUDA copied from pinned memory, so that the host does
    not wait for the device's queued work (a copy from pageable memory does: `torch.tensor(values,
    device=...)` waits for the pass before it to finish)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_syncs(fn: Callable, *args, pinned_ok: bool = False) -> list[str]:
    """The operations of `fn(*args)` (run once, for real) that wait for the device or move data between it
    and the host: what a CUDA graph cannot capture. Empty when the pass can be a graph. `pinned_ok`: not
    non-blocking copies from or to pinned host memory (they do not wait; work launched ahead may use them)."""
    with _SyncCheck(pinned_ok) as check:
        fn(*args)
    return check.found


@dataclass
class _Bucket:
    inputs: torch.Tensor  # [5 B + B W] long on the device: ids, positions, slots, lengths, sources, block tables
    views: tuple  # the step's arguments, views of `inputs`
    sources: torch.Tensor  # [B] where each row's input id comes from in a call's `feed` (-1: the ids given)
    output: torch.Tensor | None = None  # the pass's hidden states [B, H], overwritten by every call
    graph: object | None = None  # torch.cuda.CUDAGraph


class DecodeGraphs:
    """Decoding passes of `step(ids [1, B], positions [1, B], slots [B], tables [B, W], lens [B]) -> [B, H]`
    at bucketed shapes, each from a CUDA graph captured at its first use (`capture`), else run eagerly on
    the same static buffers. Every CUDA call names `device` (a worker may serve from a GPU that is not its
    thread's current one)."""

    def __init__(self, step: Callable, device: torch.device, capture: bool):
        self.step = step
        self.device = torch.device(device)
        self.capture = capture
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.failed: str | None = None  # why a capture failed: from then on every pass is eager
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._host = torch.empty(0, dtype=torch.long)
        self._copied = torch.cuda.Event() if capture else None  # the last copy out of `_host`
        # one warm-up stream and one capture stream for every bucket (the allocator keeps freed blocks per
        # stream: a stream per capture would strand its warm-up's blocks)
        self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)) if capture else None

    def __call__(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        lens: list[int],
        tables: list[list[int]],
        feed: tuple[torch.Tensor, list[int]] | None = None,
    ):
        """Hidden states [B, H] of a pass over B rows with tables of W blocks each (B and W: the bucket), in a
        tensor the next call overwrites; None once a capture has failed (the caller runs an eager pass: the
        keys and values this call may have written are the same). `feed`: (tokens on the device, for each
        row the index of its input id there or -1), for ids not yet read back (async decoding): they are
        gathered on the device after the copy, outside the graph."""
        if self.failed is not None:
            return None
        key = (len(ids), len(tables[0]))
        bucket = self.buckets.get(key)
        fresh = bucket is None
        if fresh:
            bucket = self._bucket(*key)
        sources = feed[1] if feed is not None else [-1] * len(ids)
        self._load(bucket, [*ids, *positions, *slots, *lens, *sources, *(b for t in tables for b in t)])
        if feed is not None:
            given = bucket.views[0].view(-1)
            fed = feed[0][bucket.sources.clamp(min=0)]
            given.copy_(torch.where(bucket.sources >= 0, fed, given))
        if not self.capture:
            out = self.step(*bucket.views)
            if bucket.output is None:
                bucket.output = torch.empty_like(out)
            self.buckets[key] = bucket
            return bucket.output.copy_(out)
        if fresh:
            try:
                self._capture(bucket)
            except Exception as exc:
                # a failed capture may leave torch's allocator mid-capture: no more captures in this process
                self.failed = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "decoding passes stay eager from now on: capturing %d rows x %d blocks failed (%s)",
                    *key,
                    self.failed,
                )
                return None
            self.buckets[key] = bucket
            logger.info("CUDA graph captured for decoding passes of %d rows x %d blocks", *key)
        with torch.cuda.device(self.device):
            bucket.graph.replay()
        return bucket.output

    def _bucket(self, rows: int, width: int) -> _Bucket:
        inputs = torch.zeros(5 * rows + rows * width, dtype=torch.long, device=self.device)
        ids, positions, slots, lens, sources, tables = inputs.split([rows, rows, rows, rows, rows, rows * width])
        views = (ids.view(1, rows), positions.view(1, rows), slots, tables.view(rows, width), lens)
        return _Bucket(inputs, views, sources)

    def _load(self, bucket: _Bucket, values: list[int]) -> None:
        """One host-to-device copy of the pass's inputs (from pinned memory on CUDA: it does not wait)."""
        n = len(values)
        if self._copied is not None:
            self._copied.synchronize()  # (done: the pass before it has been read back, or ran before it)
        if self._host.numel() < n:
            self._host = torch.empty(max(n, 2 * self._host.numel()), dtype=torch.long, pin_memory=self.capture)
        host = self._host[:n]
        host.numpy()[:] = values
        bucket.inputs.copy_(host, non_blocking=self.capture)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream (lazy library set-up happens outside the capture), capture on another;
        the inputs are the bucket's first real pass, which the warm-up computes and the replay computes
        again (the same keys and values written to the same slots). The thread's stream is restored even
        when the capture fails (torch's context manager leaves the capture stream current then)."""
        current = torch.cuda.current_stream(self.device)
        side, capture = self._streams
        side.wait_stream(current)
        try:
            with torch.cuda.device(self.device):
                with torch.cuda.stream(side):
                    self.step(*bucket.views)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                capture.wait_stream(current)
                with torch.cuda.graph(graph, pool=self.pool, stream=capture, capture_error_mode="thread_local"):
                    bucket.output = self.step(*bucket.views)
        finally:
            torch.cuda.set_stream(current)
        bucket.graph = graph
