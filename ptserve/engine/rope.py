"""Rotary embeddings: LongRoPE's factors chosen once, and the rotation in fewer kernels on a GPU.

LongRoPE with its factors chosen once, from the served context length, not per forward pass.

transformers' LongRoPE (Phi-3/3.5) switches between the short and the long factors from the largest
position in the *batch* at every forward. In a continuous batch that couples requests: once any row (even
a padded position) passes `original_max_position_embeddings` (4096 for Phi-3.5), every row is rotated with
the long factors, and a sequence that crosses the boundary keeps short-factor keys in its cache beside
long-factor queries. vLLM picks the factors statically instead; so does this: the long factors when the
configured context is longer than the original one, the short ones otherwise. A row's numerics then
never depend on its neighbours, and no cache mixes factors. The attention scaling (from the model's
`max_position_embeddings` / original ratio) is transformers' own in both cases.

The rotation itself (`rotate`, put in place of transformers' Phi-3 `apply_rotary_pos_emb` by
`fuse_rotary`, for tensors on FUSED_ON devices): transformers rotates the queries and the keys apart, each
`cat([x*cos + rotate_half(x)*sin, x_pass])` with `rotate_half(x) = cat(-x2, x1)`: 12 kernels a layer on a
GPU, of a decoding pass's ~45 launches a layer before CUDA graphs (and inside a graph each is still a
kernel of its own). `rotate` does both in one tensor: `cat([q, k])`, then `qk*cos + roll(qk)*signed_sin`
(`roll` by half the head is `cat(x2, x1)`; the sign goes into the sine, made once a pass for all layers):
4 kernels. The same arithmetic, the last two roundings fused into one (`addcmul`). Like the fused RMSNorm
(rmsnorm.py) the loader uses it on CUDA only: on the CPU it saved ~16 microseconds a layer (2 of a pass's
~100 small operations at the cheap shape), and transformers' own code stays the reference there. Where
Triton is there (torch's CUDA builds) and a start-up check agrees (`triton_works`), one Triton kernel does
the whole rotation instead (one program per token and head, both halves in float32, rounded once): 1
kernel a layer; not under torch.compile, whose inductor fuses the torch version itself.
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

LONGROPE = "longrope"
PINNED = "longrope-pinned"  # not a type transformers' dynamic_rope_update acts on: inv_freq stays put


def _original_length(module) -> int:
    params = module.config.rope_parameters
    return int(params.get("original_max_position_embeddings") or module.config.original_max_position_embeddings)


def pin_longrope(model: torch.nn.Module, context_length: int) -> str | None:
    """Fix every LongRoPE embedding of `model` to the factors `context_length` calls for. Returns "long",
    "short", or None when the model has no LongRoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    chosen = None
    for module in model.modules():
        if getattr(module, "rope_type", None) != LONGROPE or not hasattr(module, "inv_freq"):
            continue
        original = _original_length(module)
        long = context_length > original
        device = module.inv_freq.device
        # seq_len past the original length selects the long factors; None the short ones.
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[LONGROPE](module.config, device, seq_len=original + 1 if long else None)
        module.inv_freq.copy_(inv_freq.to(module.inv_freq.dtype))
        module.original_inv_freq = module.inv_freq.clone()
        module.attention_scaling = scaling
        module.rope_type = PINNED
        chosen = "long" if long else "short"
    if chosen is not None:
        logger.info("LongRoPE: %s factors for a %d-token context", chosen, context_length)
    return chosen


FUSED_ON = {"cuda"}  # device types whose rotations `fuse_rotary` routes through `rotate`
# (the sine of the pass being run, its signed form), one tuple: thread-safe reads; after a CUDA graph capture
# they may be the graph pool's tensors: kept for their identity only, never read again
_signed: tuple = (None, None)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' Phi-3 rotation of queries [B, H, T, D] and keys [B, KVH, T, D] by cos, sin [B, T, D]
    (every dimension rotated), in 4 kernels (1 with the Triton kernel where `triton_works` said so): the
    rotated queries and keys, views of one tensor."""
    if _triton_on and not torch.compiler.is_compiling() and _one_tensor(q, k, cos, sin):
        return rotate_triton(q, k, cos, sin)
    return _rotate_torch(q, k, cos, sin)


def _rotate_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`rotate` in 4 torch kernels (the signed sine made once a pass; compiled, inductor fuses it anyway)."""
    global _signed
    half = q.shape[-1] // 2
    compiling = torch.compiler.is_compiling()
    cached_sin, signed = _signed
    if compiling or cached_sin is not sin:
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(1)
        if not compiling:  # the first layer of a pass: every layer gets the same sin
            _signed = (sin, signed)  # (keeps `sin` alive: a later pass's cannot take its identity)
    qk = torch.cat([q, k], dim=1)
    out = torch.addcmul(qk * cos.unsqueeze(1), qk.roll(half, dims=-1), signed)
    heads = q.shape[1]
    return out[:, :heads], out[:, heads:]


_triton_on = False  # set by `triton_works` (the loader asks on CUDA)

if triton is not None:

    @triton.jit(do_not_specialize=["stride_xt", "stride_xh", "stride_ct", "stride_st", "stride_ot", "stride_oh"])
    def _rotate_kernel(
        x_ptr,  # the queries' first element: queries then keys, one run of heads [H + KVH] a token
        cos_ptr,  # [T, D]
        sin_ptr,
        out_ptr,  # [H + KVH, T, D]
        stride_xt,
        stride_xh,
        stride_ct,
        stride_st,
        stride_ot,
        stride_oh,
        HALF: tl.constexpr,
        BLOCK: tl.constexpr,  # HALF rounded up to a power of two
    ):
        token = tl.program_id(0)
        head = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        m = i < HALF
        at = x_ptr + token * stride_xt + head * stride_xh + i
        x1 = tl.load(at, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + token * stride_ct + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + token * stride_ct + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + token * stride_st + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + token * stride_st + HALF + i, mask=m, other=0.0).to(tl.float32)
        dest = out_ptr + token * stride_ot + head * stride_oh + i
        kind = out_ptr.dtype.element_ty
        tl.store(dest, (x1 * c1 - x2 * s1).to(kind), mask=m)  # x*cos + rotate_half(x)*sin, first half
        tl.store(dest + HALF, (x2 * c2 + x1 * s2).to(kind), mask=m)


def _one_tensor(q, k, cos, sin) -> bool:
    """Queries and keys as transformers' Phi-3 makes them (views of one qkv projection: the keys' heads
    right after the queries', same strides), one sequence, contiguous head dimension: what the kernel reads."""
    return (
        q.shape[0] == 1
        and k.shape[2:] == q.shape[2:]
        and cos.dim() == sin.dim() == 3
        and cos.shape[1:] == sin.shape[1:] == q.shape[2:]
        and q.stride() == k.stride()
        and q.stride(-1) == 1
        and k.data_ptr() == q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size()
        and cos.stride(-1) == 1
        and sin.stride(-1) == 1
        and q.shape[-1] % 2 == 0
    )


def rotate_triton(q, k, cos, sin):
    """`rotate` in one Triton kernel (for `_one_tensor` inputs)."""
    heads, tokens, dim = q.shape[1], q.shape[2], q.shape[3]
    out = torch.empty((1, heads + k.shape[1], tokens, dim), dtype=q.dtype, device=q.device)
    half = dim // 2
    _rotate_kernel[(tokens, heads + k.shape[1])](
        q,
        cos,
        sin,
        out,
        q.stride(2),
        q.stride(1),
        cos.stride(1),
        sin.stride(1),
        out.stride(2),
        out.stride(1),
        HALF=half,
        BLOCK=1 << (half - 1).bit_length(),
    )
    return out[:, :heads], out[:, heads:]


def triton_works(device, dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the Triton rotation runs here and agrees with `rotate`'s torch operations (3 tokens, the
    model's heads and head size, queries and keys split from one projection as transformers' Phi-3 does);
    `rotate` uses it from then on where it does."""
    global _triton_on
    if triton is None:
        return False
    from ptserve.engine import paged

    def compute():
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(1, 3, (heads + 2 * kv_heads) * head_dim, generator=gen, device=device, dtype=dtype)
        q = qkv[..., : heads * head_dim].view(1, 3, heads, head_dim).transpose(1, 2)
        k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].view(1, 3, kv_heads, head_dim).transpose(1, 2)
        angles = torch.randn(1, 3, head_dim, generator=gen, device=device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        if not _one_tensor(q, k, cos, sin):
            raise ValueError("queries and keys are not one run of heads")
        return torch.cat(rotate_triton(q, k, cos, sin), dim=1), torch.cat(_rotate_torch(q, k, cos, sin), dim=1)

    _triton_on = paged.agrees(compute, "the Triton rotation", "torch's", "the rotation in 4 torch kernels")
    return _triton_on


def _dispatch(q, k, cos, sin, unsqueeze_dim=1):
    if q.device.type in FUSED_ON and unsqueeze_dim == 1 and cos.shape[-1] == q.shape[-1]:
        return rotate(q, k, cos, sin)
    return _dispatch.original(q, k, cos, sin, unsqueeze_dim)


def fuse_rotary() -> bool:
    """Route transformers' Phi-3 rotation through `rotate` for tensors on FUSED_ON devices (process-wide:
    the function is module-level; other devices keep transformers' own). False when already routed."""
    from transformers.models.phi3 import modeling_phi3

    if modeling_phi3.apply_rotary_pos_emb is _dispatch:
        return False
    _dispatch.original = modeling_phi3.apply_rotary_pos_emb
    modeling_phi3.apply_rotary_pos_emb = _dispatch
    return True


def unfuse_rotary() -> bool:
    """transformers' own rotation back; False when it was not routed."""
    from transformers.models.phi3 import modeling_phi3

    if modeling_phi3.apply_rotary_pos_emb is not _dispatch:
        return False
    modeling_phi3.apply_rotary_pos_emb = _dispatch.original
    return True
