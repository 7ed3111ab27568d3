"""float32 and bfloat16 linear layers on the CPU with weights pre-packed for oneDNN.

`torch.nn.Linear` on the CPU calls a plain GEMM every step; oneDNN's linear with a weight reordered
once into its blocked layout made whole decode steps of the bench model 1.3-1.6x faster on the 2-core AMD
EPYC (AVX2) used on 2026-11-26: 24/58/97 ms -> 18/36/72 ms at batch 1/16/64 (README, "The engine"). In
bfloat16 on the Intel Xeon with AMX used on 2026-11-27 the bench model's linears ran 1.6-2.3x faster packed
(e.g. 512 -> 2816 at 16 rows: 135 -> 76 us), with the same results. Used for unquantized float32 and
bfloat16 models on the CPU.
"""

from __future__ import annotations

import collections
import logging

import torch

from ptserve.engine import hostmem

logger = logging.getLogger(__name__)

PACK_BATCH_HINT = 16  # the row count the blocked layout is tuned for; any row count works
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN keeps ~0.65 MB of generated code and state for every row count it has multiplied (measured here:
# 600 row counts, one 64 -> 192 layer: +377 MB, in bf16 and float32 alike), and a ragged pass can have any
# row count from 1 to the prefill budget plus the batch: a server's memory crept up by hundreds of MB.
# Rows are padded to one of a few counts instead (up to 8 rows cost what one does: the weights' read).
ROW_BUCKETS = (8, 16, 24, 32, 48, 64)  # then multiples of 32


def padded_rows(rows: int) -> int:
    for size in ROW_BUCKETS:
        if rows <= size:
            return size
    return -(-rows // 32) * 32


class PackedLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT))
        # a buffer, not a plain attribute: the module's tensors are those hostmem.release_weight_files sees
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if rows == 0:
            return x.new_empty((*x.shape[:-1], self.out_features))
        size = padded_rows(rows)
        if size != rows:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, size - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out[:rows].reshape(*x.shape[:-1], self.out_features)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears(model: torch.nn.Module) -> int:
    """Swap every float32 or bfloat16 nn.Linear under `model` for a PackedLinear; returns how many. A weight
    read from a mapped file (transformers' tensors are views of the safetensors files) leaves the process's
    resident memory once packed (`hostmem.drop_file_pages`): at Phi-3.5's shape the worker otherwise
    peaked at the packed copy plus the whole file, 14.9 GB."""
    swapped = 0
    mapped = hostmem.file_mappings(".safetensors")
    # (a weight tied to another module, an embedding, stays in use: its pages are left where they are)
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype in PACKED_DTYPES:
                setattr(parent, name, PackedLinear(child))
                if uses[id(child.weight)] == 1:
                    hostmem.drop_file_pages(child.weight, mapped)
                swapped += 1
    return swapped
