"""The KV pool's memory and the attention that reads it, plugged into transformers' model code.

`KVPool` is allocated once, at start, from the KV budget: per layer, keys and values of
[blocks, block_size, kv_heads, head_dim]. `blocks.BlockManager` decides which block holds what.

A forward pass runs the model over one ragged batch: every scheduled row's new tokens side by side,
input_ids [1, T], each token at its own position. The model's code stays transformers' own: only its
attention function is ours (`ATTENTION`, registered in transformers' AttentionInterface), and it finds
the batch's layout in the `paged=` keyword the engine passes through the model's forward. Per layer it
1. writes the T new keys and values into their pool slots, then
2. computes each row's attention over exactly its own tokens:
   - on CUDA, FlashAttention's variable-length kernel reads the pool through the block tables
     (torch.nn.attention.varlen.varlen_attn, num_splits=1: a row's numbers do not depend on its
     neighbours);
   - on the CPU (and on CUDA should that kernel be missing), rows with one new token (decoding) are
     gathered, a few at a time, into padded SDPA calls over their blocks, and each row with several new
     tokens (a prefill chunk) gets a causal SDPA call over its own fresh keys, plus, when it starts after
     position 0, an unmasked one over the blocks before it, the two merged by their log-sum-exps.
Since every row's keys are written before any row attends, a row may read blocks another row of the
same pass is writing (the prefix cache relies on it: `n` choices of one prompt share its blocks).

Without `paged=` (transformers' own generate, the tests' references) the function is transformers' SDPA
attention, unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ptserve.engine import triton_decode
from ptserve.engine.blocks import NULL_BLOCK
from ptserve.engine.graphs import on_device

logger = logging.getLogger(__name__)

ATTENTION = "ptserve_paged"


class KVPool:
    """Keys and values of every layer: 2 x layers tensors of [blocks, block_size, kv_heads, head_dim],
    allocated once. One tensor per layer and kind, not one for all: torch.compile updates a whole graph
    input in place, but a slice of a larger one it copies whole at every call (a 1 GB pool: 236 ms per
    pass)."""

    def __init__(self, num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device):
        self.block_size, self.kv_heads, self.head_dim = block_size, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        # on CUDA without the varlen kernel: prompt chunks after earlier tokens as two FlashAttention calls
        # merged (as on the CPU), once `flash_chunks_work` said so here; else one masked call
        self.flash_chunks = False
        # on CUDA without the varlen kernel: decoding rows read in place by the Triton kernel
        # (triton_decode.py), once its start-up check said so here; else gathered for SDPA
        self.triton_decode = False
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # torch.empty: on the CPU, pages nobody touched cost nothing
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for t in self.keys + self.values:
            t[NULL_BLOCK].zero_()

    @staticmethod
    def bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's keys."""
        return self.block_size * self.kv_heads * self.head_dim * self.keys[0].element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def zero(self, blocks: list[int]) -> None:
        """Zero blocks whose memory was never written (it may hold NaNs, which a masked read would spread)."""
        if blocks:
            index = on_device(blocks, self.device)  # (a decoding pass launched ahead does not wait here)
            for t in self.keys + self.values:
                t.index_fill_(0, index, 0)


@dataclass
class InPlace:
    """A decoding row's keys and values read where they lie: each long enough run of consecutive blocks as
    a view of the pool, the other blocks gathered."""

    runs: list[tuple[int, int]]  # (first block, tokens) of each run read in place
    rest: torch.Tensor | None  # [blocks] long: the other blocks, in table order; None when there are none
    rest_tokens: int  # tokens those hold (the row's last block may be partly filled)


@dataclass
class Segment:
    """A row with several new tokens this pass (a prefill chunk): tokens [q_start, q_end) of the batch,
    after `start` tokens computed by earlier passes (or read from the prefix cache), held by `table`'s
    blocks. Its queries see all of those and, causally, the chunk's own keys."""

    q_start: int
    q_end: int
    start: int
    table: torch.Tensor | None  # [blocks] long: the blocks of positions [0, start); None when start == 0


# Decoding rows per gather + SDPA call on the CPU: a group's keys stay in the cache between the two (one
# call for 64 rows of ~110 tokens took 12.6 ms, 16 calls of 4 rows 2.7 ms, bench512's attention shape).
# The rows are grouped by length, and a group reads only as many blocks as its longest row holds.
GROUP = 4
# On a GPU decoding rows are gathered into as few SDPA calls as GPU_GATHER_TOKENS allows (each call pads its
# rows to its longest): every call costs kernel launches and Python in every layer, and launches set an
# eager pass's pace there (H100, torch 2.11, Phi-3.5's shape, rows of 384 tokens, bench/engine_step.py: 64
# rows 161.7 ms a pass in calls of 4 rows, 38.6 in one; 16 rows 57.2 vs 40.0). The bound keeps the gathered
# copy's memory in check when rows are long: at Phi-3.5's shape 2^17 tokens are 1.5 GiB of one layer's keys
# and values (64 rows of 2k tokens in one call; a row of 128k tokens alone). A call also closes before a row
# that would pad the call's rows by more than GPU_CALL_TOKENS tokens in all: there one more call cost about
# as much as gathering ~25k tokens (8.2 ms a pass per call, 8 ms for 24.6k tokens; bf16, all 32 layers), so
# 63 rows of 100 tokens and one of 2,000 take two calls, not one gathering 64 x 2,000. GPU_GROUP, when
# set, caps the rows of a call too (bench/engine_step.py --groups times that).
GPU_GATHER_TOKENS = 1 << 17
GPU_CALL_TOKENS = 1 << 14
GPU_GROUP: int | None = None

# On the CPU, a decoding row whose blocks include runs of consecutive ones (as a prompt's blocks are
# allocated) attends alone, reading each run of at least MIN_RUN_BYTES of a layer's keys in place (a view:
# no copy) and gathering only the rest, the parts merged by their log-sum-exps, when its runs hold at least
# MIN_ROW_BYTES. Gathering copies the keys and values once more before the kernel reads them: at Phi-3.5's
# shape (96 KiB of keys a block) a decoding pass of 4 rows at 2,100 tokens on 4 of its layers took 129 ms
# gathered, 96 in place (126 vs 108 with a conversation's blocks: runs of 17, 4 single blocks after each).
# Below those sizes a call per row and per run costs more than the copy it saves (~70 us a call here) and
# rows are better gathered GROUP at a time: at the bench model's shape, 4 such conversations' rows took
# 29.4 ms gathered, 34.1 in place with runs of 16 KiB blocks read in place. Prompt chunks always gather
# theirs: read in place, the kernel's many passes over the keys ran slower (512 tokens after 1,600 at
# Phi-3.5's shape: 472 ms vs 510).
MIN_RUN_BYTES = 512 << 10
MIN_ROW_BYTES = 2 << 20


def in_place(table: list[int], tokens: int, block_size: int, min_run: int, min_row: int) -> InPlace | None:
    """How to read the first `tokens` positions held by `table` in runs of at least `min_run` blocks; None
    when those hold fewer than `min_row` blocks."""
    blocks = -(-tokens // block_size)
    if blocks < max(min_row, 1):
        return None
    used = np.asarray(table[:blocks])
    starts = np.flatnonzero(np.diff(used) != 1) + 1  # where each run after the first begins
    bounds = np.concatenate(([0], starts, [blocks]))
    lengths = np.diff(bounds)
    long = lengths >= min_run
    if lengths[long].sum() < max(min_row, 1):
        return None
    runs = [
        (int(used[a]), min(b * block_size, tokens) - a * block_size)
        for a, b in zip(bounds[:-1][long].tolist(), bounds[1:][long].tolist(), strict=True)
    ]
    rest = used[~np.repeat(long, lengths)]
    if not len(rest):
        return InPlace(runs, None, 0)
    return InPlace(runs, torch.from_numpy(rest), tokens - sum(t for _, t in runs))


@dataclass
class PagedBatch:
    """One forward pass's layout (built by the engine, read by every layer's attention)."""

    pool: KVPool
    slots: torch.Tensor  # [T] long: the pool slot (block * block_size + offset) of each new token
    # the rows with one new token, shortest first (in batch order for `decode`):
    single_idx: torch.Tensor | None  # [S] long: their batch positions (None: every row, in batch order)
    single_tables: torch.Tensor | None  # [S, W] long: their blocks, padded with the null block
    single_mask: torch.Tensor | None  # [S, 1, 1, W * block_size] bool: each row's own tokens
    segments: list[Segment]
    groups: list[tuple[int, int, int]] | None = None  # (first, end, blocks read) of each gather + SDPA call
    alone: list[tuple[int, InPlace]] | None = None  # rows with one new token read in place: (position, how)
    # FlashAttention's varlen layout (CUDA only), every row in batch order
    cu_seq_q: torch.Tensor | None = None
    seqused_k: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    single_lens: torch.Tensor | None = None  # [S] long: the rows' tokens (for the Triton kernel)

    @classmethod
    def build(cls, pool: KVPool, rows: list[tuple[int, int, list[int]]], use_varlen: bool) -> PagedBatch:
        """rows: (start, new tokens, block table) per row, in batch order."""
        device, bs = pool.device, pool.block_size
        slots, single, single_tables, single_lens, segments, used_tables, alone = [], [], [], [], [], [], []
        # a row alone gives the kernel one work item per key head: with fewer of those than threads (a
        # many-core host, grouped-query heads) rows are better grouped; measured on 2 threads only
        runs = pool.device.type == "cpu" and not use_varlen and pool.kv_heads >= torch.get_num_threads()
        min_run = max(1, -(-MIN_RUN_BYTES // pool.block_bytes))
        min_row = -(-MIN_ROW_BYTES // pool.block_bytes)
        q = 0
        for start, n, table in rows:
            pos = range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in pos]
            end = start + n
            used = table[: -(-end // bs)]
            used_tables.append(used)
            if n == 1:
                how = in_place(table, end, bs, min_run, min_row) if runs else None
                if how is not None:
                    alone.append((q, how))
                else:
                    single.append(q)
                    single_tables.append(used)
                    single_lens.append(end)
            elif not use_varlen:
                before = torch.tensor(table[: -(-start // bs)], device=device) if start else None
                segments.append(Segment(q, q + n, start, before))
            q += n
        batch = cls(pool, torch.tensor(slots, device=device), None, None, None, segments, alone=alone or None)
        if use_varlen:
            lens = [n for _, n, _ in rows]
            ends = [s + n for s, n, _ in rows]
            width = max(len(used) for used in used_tables)
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            batch.cu_seq_q = torch.tensor(cu, dtype=torch.int32, device=device)
            batch.seqused_k = torch.tensor(ends, dtype=torch.int32, device=device)
            padded = [used + [NULL_BLOCK] * (width - len(used)) for used in used_tables]
            batch.block_table = torch.tensor(padded, dtype=torch.int32, device=device)
            batch.max_q, batch.max_k = max(lens), max(ends)
        elif single:
            order = sorted(range(len(single)), key=single_lens.__getitem__)  # similar lengths share a group
            single = [single[i] for i in order]
            single_tables = [single_tables[i] for i in order]
            single_lens = [single_lens[i] for i in order]
            if single != list(range(q)):  # (also when some rows attend alone)
                batch.single_idx = torch.tensor(single, device=device)
            width = len(single_tables[-1])
            tables = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in single_tables], device=device)
            batch.single_tables = tables
            batch.single_lens = torch.tensor(single_lens, device=device)
            if not pool.triton_decode:  # the gather + SDPA calls (the Triton kernel reads lengths and tables)
                batch.single_mask = _length_mask(batch.single_lens, width * bs)
                batch.groups = _groups(device, [len(t) for t in single_tables], bs)
        return batch

    @classmethod
    def decode(cls, pool: KVPool, slots, tables, lens, use_varlen: bool = False, one_call: bool = False) -> PagedBatch:
        """A pass of rows with one new token each, from tensors only (traceable: `Engine._decode_step`
        is compiled). slots [B] long; tables [B, W] long (null-padded); lens [B] long: each row's tokens
        with the new one. `one_call`: every row in one gather + SDPA call (what `_groups` gives a GPU's rows
        of equal width within its bounds, without a Python loop over the rows: B stays symbolic when
        compiled for any number of rows)."""
        batch = cls(pool, slots, None, tables, None, [])
        batch.single_lens = lens
        if use_varlen:
            rows = tables.shape[0]
            batch.cu_seq_q = torch.arange(rows + 1, dtype=torch.int32, device=slots.device)
            batch.seqused_k = lens.to(torch.int32)
            batch.block_table = tables.to(torch.int32)
            batch.max_q, batch.max_k = 1, tables.shape[1] * pool.block_size
        elif not pool.triton_decode:  # the gather + SDPA calls, from shapes only
            batch.single_mask = _length_mask(lens, tables.shape[1] * pool.block_size)
            rows, width = tables.shape
            batch.groups = [(0, rows, width)] if one_call else _groups(slots.device, [width] * rows, pool.block_size)
        return batch


def _groups(device: torch.device, widths: list[int], block_size: int) -> list[tuple[int, int, int]]:
    """Decoding rows (their blocks, shortest first) split into gather + SDPA calls: (first, end, blocks each
    row of the call reads). GROUP rows a call on the CPU; on a GPU as many as GPU_GATHER_TOKENS,
    GPU_CALL_TOKENS (and GPU_GROUP) allow, one at least."""
    groups, start, real = [], 0, 0  # real: blocks the open call's rows hold
    for i in range(1, len(widths) + 1):
        real += widths[i - 1]
        if i == len(widths):
            close = True
        elif device.type == "cpu":
            close = i - start == GROUP
        else:
            padded = (i + 1 - start) * widths[i]  # blocks gathered were row i added
            close = (GPU_GROUP is not None and i - start == GPU_GROUP) or padded * block_size > GPU_GATHER_TOKENS
            close = close or (padded - real - widths[i]) * block_size > GPU_CALL_TOKENS
        if close:
            groups.append((start, i, widths[i - 1]))
            start, real = i, 0
    return groups


def _length_mask(lens: torch.Tensor, width: int) -> torch.Tensor:
    """[S] lengths -> [S, 1, 1, width] bool: position j holds one of the row's tokens."""
    return (torch.arange(width, device=lens.device) < lens.unsqueeze(1)).view(-1, 1, 1, width)


def _write(batch: PagedBatch, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """key/value [1, kv_heads, T, D] into their slots of `layer`."""
    pool = batch.pool
    for store, new in ((pool.keys[layer], key), (pool.values[layer], value)):
        store.view(-1, pool.kv_heads, pool.head_dim).index_copy_(0, batch.slots, new[0].transpose(0, 1).to(pool.dtype))


def _sdpa_rows(batch: PagedBatch, layer: int, query, key, value, scaling) -> torch.Tensor:
    """Attention for every row of the batch without FlashAttention. query [1, H, T, D] -> [T, H, D]."""
    pool = batch.pool
    heads, total = query.shape[1], query.shape[2]
    gqa = heads != pool.kv_heads
    dtype = pool.dtype
    q = query[0].to(dtype)  # [H, T, D]
    # a decoding pass, every row one token, in order, in groups:
    everyone = batch.single_idx is None and not batch.segments and batch.alone is None
    out = None if everyone else torch.empty((total, heads, query.shape[-1]), dtype=dtype, device=query.device)
    kvh, size = pool.kv_heads, pool.head_dim
    k_blocks, v_blocks = pool.keys[layer].flatten(1), pool.values[layer].flatten(1)  # [blocks, bs * kvh * D]
    if batch.single_tables is not None and pool.triton_decode:  # read in place (CUDA)
        qs = (q if everyone else q[:, batch.single_idx]).transpose(0, 1)  # [S, H, D]
        keys, values = pool.keys[layer], pool.values[layer]
        os = triton_decode.decode(qs, keys, values, batch.single_tables, batch.single_lens, scaling)
        if everyone:
            out = os
        else:
            out[batch.single_idx] = os
    elif batch.single_tables is not None:
        qs = (q if everyone else q[:, batch.single_idx]).transpose(0, 1).unsqueeze(2)  # [S, H, 1, D]
        os = qs.new_empty(qs.shape)
        tables, mask, bs = batch.single_tables, batch.single_mask, pool.block_size
        for start, end, width in batch.groups:
            index = tables[start:end, :width].reshape(-1)
            rows = end - start
            k = k_blocks.index_select(0, index).view(rows, -1, kvh, size).transpose(1, 2)  # [g, kvh, L, D]
            v = v_blocks.index_select(0, index).view(rows, -1, kvh, size).transpose(1, 2)
            group_mask = mask[start : start + rows, :, :, : width * bs]
            os[start : start + rows] = F.scaled_dot_product_attention(
                qs[start : start + rows], k, v, attn_mask=group_mask, scale=scaling, enable_gqa=gqa
            )
        if everyone:
            out = os.squeeze(2)
        else:
            out[batch.single_idx] = os.squeeze(2)
    for position, how in batch.alone or ():
        parts = _in_place_parts(q[:, position : position + 1].unsqueeze(0), pool, layer, how, scaling)
        out[position] = _merge(parts, dtype)[0, :, 0]
    for seg in batch.segments:
        qs = q[:, seg.q_start : seg.q_end].unsqueeze(0)  # [1, H, n, D]
        # the chunk's own keys, causally: this pass's fresh ones (also written to the pool above)
        k = key[:, :, seg.q_start : seg.q_end].to(dtype)
        v = value[:, :, seg.q_start : seg.q_end].to(dtype)
        if seg.table is None:  # from position 0: they are all there is
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:  # and every key before the chunk, gathered from the pool
            kp = k_blocks.index_select(0, seg.table).view(-1, kvh, size)[: seg.start].transpose(0, 1).unsqueeze(0)
            vp = v_blocks.index_select(0, seg.table).view(-1, kvh, size)[: seg.start].transpose(0, 1).unsqueeze(0)
            o = _two_part(qs, kp, vp, k, v, scaling, gqa, pool.flash_chunks)
        out[seg.q_start : seg.q_end] = o[0].transpose(0, 1)
    return out


def _in_place_parts(q, pool: KVPool, layer: int, how: InPlace, scaling) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, log-sum-exp) of q [1, H, n, D] over each part of a row's earlier keys, all visible: the runs
    as views of the pool, the rest gathered. Grouped-query heads ride along as more query positions of
    their key head (nothing is masked), so no key is copied per head."""
    keys, values, bs = pool.keys[layer], pool.values[layer], pool.block_size
    kvh, size = pool.kv_heads, pool.head_dim
    heads, n = q.shape[1], q.shape[2]
    q = q.reshape(1, kvh, (heads // kvh) * n, size)  # head h = kv head h // g: the g of a kv head in a row
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    pieces = [(keys[b : b + -(-t // bs)], values[b : b + -(-t // bs)], t) for b, t in how.runs]
    if how.rest is not None:
        pieces.append((keys.index_select(0, how.rest), values.index_select(0, how.rest), how.rest_tokens))
    parts = []
    for k, v, tokens in pieces:
        k = k.view(1, -1, kvh, size)[:, :tokens].transpose(1, 2)  # [1, kvh, tokens, D]
        v = v.view(1, -1, kvh, size)[:, :tokens].transpose(1, 2)
        o, lse = flash(q, k, v, 0.0, False, scale=scaling)[:2]
        parts.append((o.reshape(1, heads, n, size), lse.reshape(1, heads, n)))
    return parts


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype) -> torch.Tensor:
    """Attention over the union of the parts' keys from each part's (output [1, H, n, D], log-sum-exp
    [1, H, n]): outputs weighted by the softmax of their log-sum-exps."""
    if len(parts) == 1:
        return parts[0][0].to(dtype)
    weights = torch.softmax(torch.stack([lse for _, lse in parts]), 0).unsqueeze(-1)  # [P, 1, H, n, 1]
    return torch.stack([o.float() for o, _ in parts]).mul_(weights).sum(0).to(dtype)


def _two_part(q, k_before, v_before, k_own, v_own, scaling, gqa: bool, cuda_flash: bool = False) -> torch.Tensor:
    """Attention of a chunk's queries over the keys before it (all visible) and its own (causal), as two
    unmasked kernel calls merged by their log-sum-exps: what one call over both with a mask gives, up to
    float rounding (each part is rounded to the model's dtype before the merge). That call costs ~25% more
    on the CPU: the kernel converts the mask and reads it; here there is none. On CUDA (without the varlen
    kernel) the same with FlashAttention's kernel when `cuda_flash` (checked at start: `flash_chunks_work`),
    else the masked call (`_masked_chunk`). [1, H, n, D] -> [1, H, n, D]."""
    if q.device.type == "cpu":
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    elif cuda_flash:
        flash = torch.ops.aten._scaled_dot_product_flash_attention
    else:
        return _masked_chunk(q, k_before, v_before, k_own, v_own, scaling, gqa)
    if gqa:  # these kernels take as many key heads as query heads
        groups = q.shape[1] // k_own.shape[1]
        k_before, v_before, k_own, v_own = (t.repeat_interleave(groups, 1) for t in (k_before, v_before, k_own, v_own))
    o1, lse1 = flash(q, k_before, v_before, 0.0, False, scale=scaling)[:2]  # o [1, H, n, D], lse [1, H, n] f32
    o2, lse2 = flash(q, k_own, v_own, 0.0, True, scale=scaling)[:2]
    w1 = torch.sigmoid(lse1 - lse2).unsqueeze(-1)  # exp(lse1) / (exp(lse1) + exp(lse2))
    return torch.lerp(o2.float(), o1.float(), w1).to(q.dtype)


def _masked_chunk(q, k_before, v_before, k_own, v_own, scaling, gqa: bool) -> torch.Tensor:
    """`_two_part` as one SDPA call over both parts' keys with the causal mask: [n, before + n] bools."""
    n, before = q.shape[2], k_before.shape[2]
    t = torch.arange(n, device=q.device).unsqueeze(1)
    mask = torch.arange(before + n, device=q.device).unsqueeze(0) <= before + t
    k, v = torch.cat([k_before, k_own], 2), torch.cat([v_before, v_own], 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def _varlen_rows(batch: PagedBatch, layer: int, query, scaling) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    pool = batch.pool
    q = query[0].transpose(0, 1).to(pool.dtype)  # [T, H, D]
    return varlen_attn(
        q,
        pool.keys[layer],
        pool.values[layer],
        batch.cu_seq_q,
        None,
        batch.max_q,
        batch.max_k,
        scale=scaling,
        window_size=(-1, 0),
        enable_gqa=q.shape[1] != pool.kv_heads,
        seqused_k=batch.seqused_k,
        block_table=batch.block_table,
        num_splits=1,
    )


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, paged=None, **kwargs):
    """transformers' attention interface: query [1, H, T, D], key/value [1, kvh, T, D] -> ([1, T, H, D], None)."""
    if paged is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = module.layer_idx
    _write(paged, layer, key, value)
    if paged.block_table is not None:
        out = _varlen_rows(paged, layer, query, scaling)
    else:
        out = _sdpa_rows(paged, layer, query, key, value, scaling)
    return out.to(query.dtype).unsqueeze(0), None


def attention_heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers model config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def install(model: torch.nn.Module) -> None:
    """Make `model` attend with `paged_attention` (transformers' SDPA when not called by the engine). The
    engine passes a 4D placeholder as attention_mask: transformers' mask builder returns a 4D mask as it
    is, so none is built, and the attention above reads the layout from `paged=` instead."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    model.config._attn_implementation = ATTENTION
    for module in model.modules():  # sub-configs (some models keep their own)
        config = getattr(module, "config", None)
        if config is not None and config is not model.config and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTENTION


def flash_chunks_work(device, dtype, kv_heads: int, heads: int, head_dim: int) -> bool:
    """Whether FlashAttention's own kernel (with its log-sum-exp) runs here and its two-call chunk
    attention agrees with the masked call; else prompt chunks keep the masked call."""
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False

    def compute():
        gen = torch.Generator(device=device).manual_seed(0)
        before, n, gqa = 37, 7, heads != kv_heads
        q = torch.randn((1, heads, n, head_dim), generator=gen, device=device, dtype=dtype)
        shape = (before + n, kv_heads, head_dim)  # laid out as the pass has them: [L, kvh, D] seen as [1, kvh, L, D]
        k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).transpose(0, 1)[None] for _ in "kv")
        parts = (k[:, :, :before], v[:, :, :before], k[:, :, before:], v[:, :, before:])
        fast = _two_part(q, *parts, head_dim**-0.5, gqa, cuda_flash=True)
        return fast, _masked_chunk(q, *parts, head_dim**-0.5, gqa)

    return agrees(compute, "FlashAttention's two-call chunk attention", "the masked call", "one masked call")


def varlen_works(device, dtype, block_size: int, kv_heads: int, heads: int, head_dim: int) -> bool:
    """Whether FlashAttention's varlen kernel runs here with this pool layout and agrees with the SDPA path:
    a decoding row, a prompt from position 0 and a chunk after a shared cached block, one pass, both ways.
    Anything else (an older GPU, a kernel that refuses the block size, a torch without the paged arguments)
    takes the SDPA path instead of failing every pass."""
    if torch.cuda.get_device_capability(device) < (8, 0):  # FlashAttention 2 wants Ampere or newer
        logger.info("FlashAttention's varlen kernel needs compute capability 8.0: SDPA over gathered blocks")
        return False

    def compute():
        pool = KVPool(1, 4, block_size, kv_heads, head_dim, dtype, device)
        gen = torch.Generator(device=device).manual_seed(0)
        for store in pool.keys + pool.values:
            store.normal_(generator=gen)
        rows = [(5, 1, [1]), (0, 3, [2]), (block_size, 3, [1, 3])]
        total = sum(n for _, n, _ in rows)
        q = torch.randn((1, heads, total, head_dim), generator=gen, device=device, dtype=dtype)
        k = torch.randn((1, kv_heads, total, head_dim), generator=gen, device=device, dtype=dtype)
        v = torch.randn((1, kv_heads, total, head_dim), generator=gen, device=device, dtype=dtype)
        layer = type("Layer", (), {"layer_idx": 0})()
        scale = head_dim**-0.5
        fast, _ = paged_attention(layer, q, k, v, None, scale, paged=PagedBatch.build(pool, rows, True))
        slow, _ = paged_attention(layer, q, k, v, None, scale, paged=PagedBatch.build(pool, rows, False))
        return fast, slow

    return agrees(compute, "FlashAttention's varlen kernel", "SDPA", "SDPA over gathered blocks")


def agrees(compute, what: str, reference: str, instead: str) -> bool:
    """A start-up check: whether `compute()` -> (fast, reference's) runs here and the two agree at bf16's
    tolerance; else False, with a warning saying why `what` is not used and what is (`instead`)."""
    try:
        fast, slow = compute()
        agree = torch.allclose(fast.float(), slow.float(), atol=2e-2, rtol=2e-2)
    except Exception as exc:  # the kernel refused (an older GPU, a torch or Triton without it): say why
        logger.warning("%s is unusable here (%s): %s", what, exc, instead)
        return False
    if not agree:
        logger.warning("%s disagrees with %s here: %s", what, reference, instead)
    return agree
