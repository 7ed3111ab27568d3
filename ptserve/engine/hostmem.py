"""Host memory while the engine works, and when it goes idle.

While busy, `keep_freed_memory()`: glibc's malloc serves a block of 128 KiB or more (its threshold grows
with use, to 32 MiB at most) by mmap and unmaps it when freed, and gives the top of its heap back to the
kernel whenever more than twice that is free. A pass allocates and frees tensors of megabytes (gathered
keys and values, activations, logits) in every layer, so each one came back as fresh pages: 57,000 page
faults a decoding pass of 64 rows on the bench model here, which then took 180 ms instead of 91 (105
instead of 67 with rows of like lengths). Below 32 MiB blocks now come from the heap, and freed memory
stays there for the next pass.

When idle, `release_host_memory()`: what the passes freed goes back to the kernel (`malloc_trim(0)`, a
few milliseconds, only when there is nothing else to do), so the worker's resident memory does not stay
at its high-water mark. Both are no-ops where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # in effect never on free (an int): release_host_memory() trims when idle


@functools.cache
def _libc_function(name: str):
    libc = ctypes.util.find_library("c")  # None where ldconfig is missing: then the process's own symbols
    try:
        return getattr(ctypes.CDLL(libc), name)
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim / mallopt
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed blocks below 32 MiB in the heap for reuse (process-wide, once). True where it applied."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    refused = [
        name
        for name, param, value in (
            ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
        if not mallopt(param, value)
    ]
    if refused:
        logger.info("mallopt refused %s: freed host memory may go back to the kernel at once", ", ".join(refused))
    return not refused


def release_host_memory() -> None:
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
