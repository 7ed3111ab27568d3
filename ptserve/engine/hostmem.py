"""Give freed host memory back to the operating system when the engine goes idle.

glibc's malloc keeps what a process frees in its arenas for reuse. The engine allocates and frees tensors
of ever-changing shapes (the KV cache grows with the batch and is freed when idle, prefill activations
scale with the prompt), so without a trim the worker's resident memory only ratchets up to its
high-water mark and stays there, fragmented. `malloc_trim(0)` returns the free pages; it costs a few
milliseconds and runs only when there is nothing else to do. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return None


def release_host_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
