"""Host memory while the engine works, and when it goes idle.

While busy, `keep_freed_memory()`: left to its defaults, glibc's malloc serves a block of 128 KiB or more
(its threshold grows with use, to 32 MiB at most) by mmap and unmaps it when freed, and gives the top of
its heap back to the kernel whenever more than twice that is free. A pass allocates and frees tensors of
megabytes (gathered keys and values, activations, logits) in every layer, so each one came back as fresh
pages: 57,000 page faults a decoding pass of 64 rows on the bench model here, which then took 180 ms
instead of 91 (105 instead of 67 with rows of like lengths). Now no block is mmap'd, whatever its size,
and freed memory stays in the heap for the next pass.

In the server's engine processes, also `one_arena()`: glibc gives each thread but the main one an arena
of its own, made of heaps of at most 64 MiB, and the engine steps on a thread of its own. At Phi-3.5's
shape a pass's temporaries are tens of MiB (one decoding row's keys at 2,100 tokens: 12.4 MiB a layer,
and as much for its values; a group of 4 rows, 50 MiB) and did not fit those heaps' leftovers: 101,000
page faults a pass of 4 such rows on 4 of Phi-3.5's layers, 325 ms instead of 130. In the main arena
(one heap, grown as needed) there are none once the first passes have grown it. Set by mallopt once
threads have allocated, glibc's limit may not apply (it is computed once, freed arenas are reused): it goes
in the environment of the processes about to be spawned, which glibc reads at their start.

When idle, `release_host_memory()`: what the passes freed goes back to the kernel (`malloc_trim(0)`, a
few milliseconds), so the worker's resident memory does not stay at its high-water mark. The engine calls it
once nothing has arrived for a while (scheduler.IDLE_RELEASE_S), not as soon as it idles: the next pass
would fault it all in again. All are no-ops where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

logger = logging.getLogger(__name__)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # in effect never on free (an int): release_host_memory() trims when idle
ARENA_VARIABLE = "MALLOC_ARENA_MAX"  # glibc's environment variable for M_ARENA_MAX


@functools.cache
def _libc_function(name: str):
    libc = ctypes.util.find_library("c")  # None where ldconfig is missing: then the process's own symbols
    try:
        return getattr(ctypes.CDLL(libc), name)
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim / mallopt
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Serve every block from the heap and keep freed ones there for reuse (process-wide, once). True where
    it applied."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    refused = [
        name
        for name, param, value in (
            ("M_MMAP_MAX", M_MMAP_MAX, 0),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
        if not mallopt(param, value)
    ]
    if refused:
        logger.info("mallopt refused %s: freed host memory may go back to the kernel at once", ", ".join(refused))
    return not refused


def one_arena(environ=os.environ) -> None:
    """Processes spawned from now on with `environ` (the engine's workers) allocate from one arena, unless
    the user set MALLOC_ARENA_MAX already. Harmless where glibc is not the allocator (nothing reads it)."""
    environ.setdefault(ARENA_VARIABLE, "1")


def release_host_memory() -> None:
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
