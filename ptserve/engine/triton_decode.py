"""Decoding rows' attention read from the KV pool in place, by a Triton kernel (CUDA, torch without the paged
varlen kernel).

Without FlashAttention's paged varlen kernel (torch 2.13), a GPU's decoding rows gather their blocks into
a padded copy for SDPA: every layer writes each row's keys and values once more and reads them twice (at
Phi-3.5's shape on an H100, 64 rows of 384 tokens: ~8 ms a pass gathering, ~5 ms in SDPA; bench/engine_step.py
with torch 2.11). This kernel reads each row's blocks where they lie, through its block table, as paged
attention kernels do (vLLM's first, SGLang's Triton decode attention): one program per row, query head and
split of the row's blocks, an online softmax over 16-token blocks in float32, each split's output and
log-sum-exp merged after (flash decoding: a short batch of long rows still fills the GPU). One kernel and
a short merge a layer, in place of the gather's copies and SDPA's calls; it runs inside CUDA graphs. The merge is a
second small kernel (one program per row and head: the splits' outputs weighed by the softmax of their
log-sum-exps, written in the queries' dtype), one launch where torch's ops took four.

Triton comes with torch's CUDA builds; where it is missing, or the start-up check (`works`) finds the kernel
refused or disagreeing with the gathered SDPA path, the engine keeps that path. The tests run the kernel on
the CPU in Triton's interpreter (TRITON_INTERPRET=1, float32) when Triton is installed, and on a GPU.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:  # Triton comes with torch's CUDA builds
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# A call's programs (rows x query heads x splits): a row's blocks are split until a call has this many, as
# long as each split reads MIN_SPLIT_BLOCKS blocks at least (a few long rows still fill a large GPU: an H100
# has 132 SMs; every split costs its partial output and the merge).
TARGET_PROGRAMS = 1024
MIN_SPLIT_BLOCKS = 4


def available() -> bool:
    return triton is not None


if triton is not None:
    # one compiled kernel whatever the rows' count, lengths and splits (and wherever a graph's inputs lie)
    @triton.jit(
        do_not_specialize=[
            "blocks_per_split",
            "stride_qb",
            "stride_qh",
            "stride_tb",
            "stride_ob",
            "stride_oh",
            "stride_os",
            "stride_lb",
            "stride_lh",
        ],
        do_not_specialize_on_alignment=["q_ptr", "tables_ptr", "lens_ptr"],
    )
    def _paged_decode(
        q_ptr,  # [B, H, D]
        k_ptr,  # [blocks, BLOCK_SIZE, KV_HEADS, D] (any strides but the last)
        v_ptr,
        tables_ptr,  # [B, W] int64
        lens_ptr,  # [B] int64: each row's tokens, the new one included
        out_ptr,  # [B, H, S, D] float32: each split's output
        lse_ptr,  # [B, H, S] float32: each split's log-sum-exp (-inf: no token)
        scale,
        blocks_per_split,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_tb,
        stride_ob,
        stride_oh,
        stride_os,
        stride_lb,
        stride_lh,
        GROUP: tl.constexpr,  # query heads per key head
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kv_head = head // GROUP
        d = tl.arange(0, BLOCK_D)
        in_dim = d < HEAD_DIM
        t = tl.arange(0, BLOCK_SIZE)
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + d, mask=in_dim, other=0.0).to(tl.float32)
        q = q * scale
        n = tl.load(lens_ptr + row)
        first = split * blocks_per_split
        # the split's blocks that hold any of the row's tokens (a loop without a branch: it pipelines)
        last = tl.minimum(first + blocks_per_split, (n + BLOCK_SIZE - 1) // BLOCK_SIZE)
        m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for index in range(first, last):
            block = tl.load(tables_ptr + row * stride_tb + index)
            valid = index * BLOCK_SIZE + t < n
            mask = valid[:, None] & in_dim[None, :]
            k_at = k_ptr + block * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
            k = tl.load(k_at, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, BLOCK_D]
            scores = tl.sum(k * q[None, :], 1)
            scores = tl.where(valid, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            v_at = v_ptr + block * stride_vb + t[:, None] * stride_vt + kv_head * stride_vh + d[None, :]
            v = tl.load(v_at, mask=mask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(out_ptr + row * stride_ob + head * stride_oh + split * stride_os + d, out, mask=in_dim)
        tl.store(lse_ptr + row * stride_lb + head * stride_lh + split + tl.arange(0, 1), lse)

    @triton.jit(do_not_specialize=["count", "stride_ob", "stride_oh", "stride_lb", "stride_lh", "stride_rb"])
    def _merge_splits(
        out_ptr,  # [B, H, S, D] float32: each split's output (the head dimension contiguous)
        lse_ptr,  # [B, H, S] float32: each split's log-sum-exp (-inf: no token; the splits contiguous)
        result_ptr,  # [B, H, D] in the queries' dtype (contiguous)
        count,
        stride_ob,
        stride_oh,
        stride_lb,
        stride_lh,
        stride_rb,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,  # count rounded up to a power of two
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        lse = tl.load(lse_ptr + row * stride_lb + head * stride_lh + s, mask=s < count, other=float("-inf"))
        seen = lse != float("-inf")  # (a NaN split is not dropped: the result shows it)
        m = tl.max(lse, 0)
        w = tl.where(seen, tl.exp(lse - m), 0.0)  # each split's share: softmax over the log-sum-exps
        total = tl.sum(w, 0)
        w = w / tl.where(total > 0, total, 1.0)
        at = out_ptr + row * stride_ob + head * stride_oh + s[:, None] * HEAD_DIM + d[None, :]
        o = tl.load(at, mask=seen[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        merged = tl.sum(o * w[:, None], 0)
        at = result_ptr + row * stride_rb + head * HEAD_DIM + d
        tl.store(at, merged.to(result_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def splits(rows: int, heads: int, width: int) -> tuple[int, int]:
    """(splits, blocks per split) for rows of `width` blocks: from shapes only (a CUDA graph's are fixed)."""
    wanted = min(-(-width // MIN_SPLIT_BLOCKS), max(1, -(-TARGET_PROGRAMS // (rows * heads))))
    per = -(-width // wanted)
    return -(-width // per), per


def decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables, lens, scale: float | None
) -> torch.Tensor:
    """Attention of one query token per row over its own tokens in the pool: q [B, H, D], keys/values
    [blocks, block_size, kv_heads, D], tables [B, W] (null-padded), lens [B] (tokens, the new one
    included) -> [B, H, D] in q's dtype."""
    rows, heads, dim = q.shape
    block_size, kv_heads = keys.shape[1], keys.shape[2]
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or tables.stride(1) != 1 or lens.stride(0) != 1:
        raise ValueError("the pool's head dimension, the tables' rows and the lengths must be contiguous")
    scale = dim**-0.5 if scale is None else scale
    count, per = splits(rows, heads, tables.shape[1])
    out = torch.empty((rows, heads, count, dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((rows, heads, count), dtype=torch.float32, device=q.device)
    q = q.contiguous() if q.stride(-1) != 1 else q
    _paged_decode[(rows, heads, count)](
        q,
        keys,
        values,
        tables,
        lens,
        out,
        lse,
        scale,
        per,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        GROUP=heads // kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=dim,
        BLOCK_D=1 << (dim - 1).bit_length(),
    )
    # the splits merged and the result in q's dtype, one kernel (torch's softmax, product, sum and cast
    # were four launches a layer; one split: only the cast, still one)
    return _merge(out, lse, q.dtype)


def _merge(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Splits' outputs [B, H, S, D] and log-sum-exps [B, H, S] (float32, contiguous) -> [B, H, D] in `dtype`."""
    rows, heads, count, dim = out.shape
    assert out.is_contiguous() and lse.is_contiguous()  # (the kernel's strides between splits and heads)
    result = torch.empty((rows, heads, dim), dtype=dtype, device=out.device)
    _merge_splits[(rows, heads)](
        out,
        lse,
        result,
        count,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        result.stride(0),
        HEAD_DIM=dim,
        BLOCK_D=1 << (dim - 1).bit_length(),
        BLOCK_S=1 << (count - 1).bit_length(),
    )
    return result


def works(device, dtype, block_size: int, kv_heads: int, heads: int, head_dim: int) -> bool:
    """Whether the kernel runs here and agrees with SDPA over the gathered blocks: rows of 1, 17 and 300
    tokens (300: split across programs), blocks out of order, grouped heads as the model has them; then the
    merge is compiled for every number of splits a pass can have (not in the middle of serving)."""
    if not available():
        return False

    def compute():
        gen = torch.Generator(device=device).manual_seed(0)
        lens = [1, 17, 300]
        width = -(-max(lens) // block_size)
        blocks = 3 * width + 1  # and the null block
        shape = (blocks, block_size, kv_heads, head_dim)
        keys = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        values = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        order = torch.randperm(blocks - 1, generator=torch.Generator().manual_seed(0)) + 1
        tables = order.view(3, width).to(device)
        q = torch.randn((3, heads, head_dim), generator=gen, device=device, dtype=dtype)
        scale = head_dim**-0.5
        got = decode(q, keys, values, tables, torch.tensor(lens, device=device), scale)
        return got, reference(q, keys, values, tables, lens, scale)

    from ptserve.engine import paged  # (start-up only; paged imports this module)

    if not paged.agrees(compute, "the Triton decode kernel", "SDPA", "SDPA over gathered blocks"):
        return False
    # the merge is compiled per power of two of splits: all of them now, not when a pass first needs one
    most = -(-TARGET_PROGRAMS // heads)
    for count in (1 << b for b in range((most - 1).bit_length() + 1)):
        out = torch.zeros((1, heads, count, head_dim), dtype=torch.float32, device=device)
        decoded = _merge(out, torch.zeros((1, heads, count), device=device), dtype)
    return bool(torch.isfinite(decoded).all())


def reference(q, keys, values, tables, lens: list[int], scale: float) -> torch.Tensor:
    """`decode` as SDPA over each row's gathered tokens, one row at a time (the tests' and `works`' yardstick)."""
    rows, heads, dim = q.shape
    kv_heads = keys.shape[2]
    out = []
    for r, n in enumerate(lens):
        k = keys[tables[r]].flatten(0, 1)[:n].transpose(0, 1)  # [kvh, n, D]
        v = values[tables[r]].flatten(0, 1)[:n].transpose(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[r].unsqueeze(1), k, v, scale=scale, enable_gqa=heads != kv_heads
        )  # [H, 1, D]
        out.append(o[:, 0])
    return torch.stack(out)
