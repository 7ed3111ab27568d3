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

After loading on the CPU, `release_weight_files(model)`: transformers maps the safetensors files and its
tensors are views of them; once the linears are packed for oneDNN (or quantized) the few tensors left there
(the embedding, the norms) kept the whole mapping, every page of it read while packing: at Phi-3.5's shape
the worker showed 14.6 GB resident for a 7.6 GB model (7.2 GB of it the file). Those tensors are copied into
the process's own memory and the mapping goes (7.7 GB). Where most of the file is still the model's (weights
not packed), the mapping stays: the page cache serves them, and other processes of the same model share it.
While packing, `drop_file_pages` takes each packed weight's pages out of resident memory (the loading peak
at that shape: 14.9 -> 7.8 GB).
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


# of the mapped files' bytes: tensors holding more stay mapped (the copy would cost the process more than half
# of what unmapping gives back, and the page cache serves them as well)
KEEP_MAPPED_FRACTION = 0.5


def file_mappings(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files ending in `suffix` (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split() for line in maps]
    except OSError:
        return []
    ranges = []
    for fields in lines:
        if len(fields) >= 6 and fields[-1].endswith(suffix):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def release_weight_files(model, suffix: str = ".safetensors") -> int:
    """Copy the CPU tensors of `model` that are still views of its mapped weight files into the process's
    own memory, so that the mappings go, when they are a small part of those files (see the module's
    docstring); how many mappings that was meant to release (0: none, or kept)."""
    import torch

    ranges = file_mappings(suffix)
    if not ranges:
        return 0
    found, used = [], set()
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is None or t.device.type != "cpu" or t.layout != torch.strided or t.is_mkldnn:
                    continue
                where = next((r for r in ranges if r[0] <= t.data_ptr() < r[1]), None)
                if where is not None:
                    found.append((module, kind, name, t))
                    used.add(where)
    mapped = sum(end - start for start, end in used)  # (the mappings this model's tensors are in)
    held = sum(t.nbytes for t in {id(t): t for *_, t in found}.values())
    if not found or held > KEEP_MAPPED_FRACTION * mapped:
        return 0
    with torch.no_grad():
        for module, kind, name, t in found:
            if kind == "_parameters":
                t.data = t.data.clone()  # (the same Parameter: weights tied to it stay tied)
            else:
                module._buffers[name] = t.clone()
    del found, t
    if used & set(file_mappings(suffix)):  # a tensor outside the modules' parameters and buffers holds it
        logger.warning("the weight files stay mapped: a tensor the model's modules do not list is a view of them")
    return len(used)


MADV_DONTNEED = 4  # Linux's madvise advice: drop these pages (a file's are read again if touched)


def drop_file_pages(tensor, ranges: list[tuple[int, int]]) -> bool:
    """Take the pages that lie wholly inside `tensor`'s bytes out of this process's resident memory when
    those bytes are in one of `ranges` (mapped files, `file_mappings`): a weight read once to be packed
    otherwise stays resident as long as the file is mapped. Read again, its pages come back from the file:
    for a tensor nothing uses any more (the mapping is private: a page written in place would come back as
    the file has it). True where it applied."""
    madvise = _libc_function("madvise")
    start, size = tensor.data_ptr(), tensor.nbytes
    if madvise is None or not any(lo <= start and start + size <= hi for lo, hi in ranges):
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-start // page) * page, (start + size) // page * page
    if last <= first:
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(first, last - first, MADV_DONTNEED) == 0


def release_host_memory() -> None:
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
