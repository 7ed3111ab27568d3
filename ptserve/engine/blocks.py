"""The KV pool's bookkeeping: fixed-size blocks, reference counts, and the prefix cache. Pure Python, no
tensors: `paged.KVPool` holds the memory these block ids index.

- The pool has `num_blocks` blocks of `block_size` token positions. Block 0 is the null block: never
  handed out, always zero, it pads block tables. `reserve()` sets a block aside for the engine's own use
  (the scratch block the padded rows of a compiled decode write to).
- A sequence holds a list of blocks (its block table). `allocate(n)` hands out free blocks or returns
  None when there are not enough; `release(blocks)` drops a sequence's references.
- Prefix caching: a block that holds `block_size` tokens is keyed by a hash of *all* the tokens from the
  start of the sequence to its end (the hash chains the previous block's), so equal keys mean an equal
  prefix and so equal keys and values. `lookup(tokens)` returns the cached blocks of the longest cached
  prefix (referenced: they cannot be evicted while in use); `register(block, key)` publishes a block once
  its content is scheduled to be computed. A block nobody references stays cached, in LRU order, until a
  fresh block is needed and none is free: then the least recently used one is evicted (its key dropped).

Free blocks are handed out in this order: released blocks that hold no cached prefix, then blocks never
used yet (the caller zeroes them: their memory may hold anything), then the least recently used cached
ones. So a server without repeated prefixes touches only the memory its peak load needs.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

NULL_BLOCK = 0
ROOT_KEY = b""


def block_keys(tokens: list[int], block_size: int, start_key: bytes = ROOT_KEY, first: int = 0) -> list[bytes]:
    """Keys of the full blocks of `tokens` from block `first` on (`start_key` is block first-1's key).
    Each key is a 128-bit BLAKE2 digest of the previous key and the block's token ids: a prefix's key
    cannot be forged by a client to collide with another user's (Python's int hash could be)."""
    keys = []
    key = start_key
    for b in range(first, len(tokens) // block_size):
        chunk = array("i", tokens[b * block_size : (b + 1) * block_size]).tobytes()
        key = hashlib.blake2b(key + chunk, digest_size=16).digest()
        keys.append(key)
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (the null block and one more), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}  # block -> its prefix key, while it holds a cached prefix
        self.block_of: dict[bytes, int] = {}  # prefix key -> block
        self._free_plain: list[int] = []  # released, no cached content (LIFO: recently touched memory first)
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # released, cached; least recently used first
        self._untouched = 1  # blocks [_untouched, num_blocks) have never been handed out
        self.reserved = 0  # blocks set aside by reserve(), never handed out
        self.fresh: list[int] = []  # never-used blocks handed out since the caller last zeroed them
        # counters (read racily from another thread for /metrics)
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found cached
        self.evictions = 0

    # -- gauges -----------------------------------------------------------------------------------------
    @property
    def usable(self) -> int:
        return self.num_blocks - 1 - self.reserved

    @property
    def free(self) -> int:
        return len(self._free_plain) + len(self._free_cached) + (self.num_blocks - self._untouched)

    @property
    def used(self) -> int:
        return self.usable - self.free

    @property
    def touched(self) -> int:
        """Blocks ever handed out or reserved, and the null block: those whose memory has been written."""
        return self._untouched

    @property
    def cached(self) -> int:
        """Blocks holding a cached prefix, in use or not."""
        return len(self.key_of)

    # -- allocation ---------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks, each referenced once, or None (nothing taken) when fewer are free."""
        if n > self.free:
            return None
        out = []
        while len(out) < n:
            if self._free_plain:
                block = self._free_plain.pop()
            elif self._untouched < self.num_blocks:
                block = self._untouched
                self._untouched += 1
                self.fresh.append(block)
            else:
                block, _ = self._free_cached.popitem(last=False)
                del self.block_of[self.key_of.pop(block)]
                self.evictions += 1
            self.refs[block] = 1
            out.append(block)
        return out

    def reserve(self) -> int:
        """A never-used block, set aside for good (not counted as usable); the caller zeroes it."""
        if self._untouched >= self.num_blocks:
            raise ValueError("no never-used block left to reserve")
        if self.usable < 2:
            raise ValueError(
                f"the KV pool has {self.num_blocks} blocks: too few to set one aside and still hold a sequence"
            )
        self.reserved += 1
        self._untouched += 1
        return self._untouched - 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Released in reverse, so a sequence's last blocks (the least
        likely to be shared) are evicted first."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if block in self.key_of:
                self._free_cached[block] = None
            else:
                self._free_plain.append(block)

    # -- prefix cache -------------------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest cached prefix among `keys` (a sequence's block keys in order), each
        referenced once more."""
        found = []
        for key in keys if self.prefix_caching else ():
            block = self.block_of.get(key)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self.refs[block] == 0:
                del self._free_cached[block]
            self.refs[block] += 1
        return found

    def count_query(self, tokens: int, hit: int) -> None:
        self.queries += tokens
        self.hits += hit

    def register(self, block: int, key: bytes) -> bool:
        """Publish `block` (in use, its content computed by this step or before) as holding the prefix
        `key`. False when caching is off, the block is already registered, or another block already holds
        that prefix (two sequences computed it at once): then this one stays private."""
        if not self.prefix_caching or block in self.key_of or key in self.block_of:
            return False
        self.key_of[block] = key
        self.block_of[key] = block
        return True

    def unregister(self, block: int) -> None:
        """Forget what `block` holds (its computation failed)."""
        key = self.key_of.pop(block, None)
        if key is None:
            return
        del self.block_of[key]
        if block in self._free_cached:
            del self._free_cached[block]
            self._free_plain.append(block)

    def take_fresh(self) -> list[int]:
        """The never-used blocks handed out since the last call: their memory must be zeroed."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def reset_prefix_cache(self) -> None:
        for block in list(self.key_of):
            self.unregister(block)
