"""A KV cache of per-row slots with per-row positions, for sequences of different lengths in one batch.

Layout per layer: keys and values [rows, kv_heads, capacity, head_dim]. Row r holds one sequence's
tokens at positions 0..length-1 (right-padded; what lies beyond a row's length is masked). A forward
pass over rows [first, first + n) writes each row's new keys at its own positions and attends over
[0, max_end) with a 4D mask, so nothing is recomputed when sequences join or leave:
- a sequence joins by prefilling into a row at the end;
- a sequence leaves by moving the last row into its place (one row copy per layer).
Both dimensions grow by doubling when needed; the model's attention (SDPA or eager) does the math.

The model calls `update()` from each attention layer; transformers' own caches are not involved.
"""

from __future__ import annotations

import torch

MIN_ROWS = 4
MIN_CAPACITY = 64


def _grow(n: int, minimum: int) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


class SlotKVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows_cap = 0
        self.capacity = 0
        # Set by `prepare()` for the next forward pass.
        self._first = 0
        self._rows = 0
        self._write_pos: torch.Tensor | None = None  # [n, Q] absolute positions to write
        self._end = 0

    # -- sizing -------------------------------------------------------------------------------------
    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def ensure(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` positions, keeping what is stored."""
        if rows <= self.rows_cap and length <= self.capacity:
            return
        new_rows = max(self.rows_cap, _grow(rows, MIN_ROWS))
        new_cap = max(self.capacity, _grow(length, MIN_CAPACITY))
        shape = (new_rows, self.kv_heads, new_cap, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if store and self.rows_cap:
                    fresh[: self.rows_cap, :, : self.capacity] = store[i]
                if len(store) == self.num_layers:
                    store[i] = fresh
                else:
                    store.append(fresh)
        self.rows_cap, self.capacity = new_rows, new_cap

    def release(self) -> None:
        """Free the buffers (when the engine goes idle)."""
        self.keys, self.values = [], []
        self.rows_cap = self.capacity = 0

    def allocated_tokens(self) -> int:
        return self.rows_cap * self.capacity

    # -- row moves ----------------------------------------------------------------------------------
    def move_row(self, src: int, dst: int) -> None:
        for store in (self.keys, self.values):
            for layer in store:
                layer[dst] = layer[src]

    def copy_rows_from(self, other: SlotKVCache, src_first: int, dst_first: int, n: int, length: int) -> None:
        """Copy rows [src_first, +n) of `other`, positions [0, length), into rows [dst_first, +n) here."""
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for a, b in zip(mine, theirs, strict=True):
                a[dst_first : dst_first + n, :, :length] = b[src_first : src_first + n, :, :length]

    # -- one forward pass ---------------------------------------------------------------------------
    def prepare(self, first: int, starts: torch.Tensor, q_len: int) -> tuple[torch.Tensor, int]:
        """Set up a pass over rows [first, first + len(starts)), each writing q_len positions from its
        start. Returns position ids [n, q_len] and the attended length (max start + q_len)."""
        n = starts.shape[0]
        positions = starts.unsqueeze(1) + torch.arange(q_len, device=starts.device).unsqueeze(0)
        end = int(starts.max()) + q_len
        self.ensure(first + n, end)
        self._first, self._rows, self._write_pos, self._end = first, n, positions, end
        return positions, end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value_states: [n, kv_heads, q_len, head_dim] -> all keys/values [n, kv_heads, end, head_dim]."""
        rows = slice(self._first, self._first + self._rows)
        k, v = self.keys[layer_idx][rows], self.values[layer_idx][rows]
        n, _, q_len, _ = key_states.shape
        if q_len == 1:  # decode: one position per row
            idx = torch.arange(n, device=k.device)
            pos = self._write_pos[:, 0]
            k[idx, :, pos] = key_states[:, :, 0].to(self.dtype)
            v[idx, :, pos] = value_states[:, :, 0].to(self.dtype)
        else:
            idx = torch.arange(n, device=k.device).unsqueeze(1)  # [n, 1] with positions [n, q_len]
            k[idx, :, self._write_pos] = key_states.transpose(1, 2).to(self.dtype)
            v[idx, :, self._write_pos] = value_states.transpose(1, 2).to(self.dtype)
        return k[:, :, : self._end], v[:, :, : self._end]

    # transformers' attention code may ask these of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._end

    @property
    def is_compileable(self) -> bool:
        return False


def attention_mask(
    starts: torch.Tensor, lengths: torch.Tensor, q_len: int, end: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [n, 1, q_len, end]: query t of row b sees keys j <= start_b + t that hold real
    tokens (j < start_b + lengths_b). Padded query rows still see their row's real keys (no NaN)."""
    j = torch.arange(end, device=starts.device).view(1, 1, 1, end)
    t = torch.arange(q_len, device=starts.device).view(1, 1, q_len, 1)
    s = starts.view(-1, 1, 1, 1)
    last = (s + lengths.view(-1, 1, 1, 1) - 1).clamp(min=0)
    visible = j <= torch.minimum(s + t, last)
    return torch.zeros(visible.shape, dtype=dtype, device=starts.device).masked_fill(~visible, torch.finfo(dtype).min)
