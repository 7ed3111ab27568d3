"""Linear layers packed for oneDNN on the CPU (`ptserve.engine.cpu_linear`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ptserve.engine import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no oneDNN in this torch")


def test_row_counts_are_padded_to_a_few_sizes():
    sizes = {cpu_linear.padded_rows(rows) for rows in range(1, 577)}
    assert [cpu_linear.padded_rows(n) for n in (1, 8, 9, 17, 25, 33, 49, 64, 65, 96, 97, 520)] == [
        8,
        8,
        16,
        24,
        32,
        48,
        64,
        64,
        96,
        96,
        128,
        544,
    ]
    assert len(sizes) == 6 + 16  # up to a 512-token prefill chunk and 64 decoding rows


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_packed_layer_computes_what_the_linear_does_for_any_row_count(dtype, atol):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 40).to(dtype)
    packed = cpu_linear.PackedLinear(linear)
    with torch.inference_mode():
        for rows in (1, 5, 8, 9, 33, 70):
            x = torch.randn(1, rows, 48, generator=gen).to(dtype)
            got = packed(x)
            assert got.shape == (1, rows, 40) and got.dtype == dtype
            torch.testing.assert_close(got.float(), linear(x).float(), atol=atol, rtol=atol)
        flat = torch.randn(7, 48, generator=gen).to(dtype)
        torch.testing.assert_close(packed(flat).float(), linear(flat).float(), atol=atol, rtol=atol)


MEMORY = """
import sys, torch
from ptserve.engine import cpu_linear
if sys.argv[1] == "exact":  # every row count as it comes, as before
    cpu_linear.padded_rows = lambda rows: rows
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
layer = cpu_linear.PackedLinear(torch.nn.Linear(64, 192, bias=False).to(torch.bfloat16))
x = torch.randn(1, 300, 64).to(torch.bfloat16)
with torch.inference_mode():
    layer(x[:, :1])
    before = rss_mb()
    for rows in range(1, 301):
        layer(x[:, :rows])
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_does_not_grow_with_every_new_row_count():
    """oneDNN keeps generated code and state for each row count it has multiplied (~0.65 MB each): a
    ragged pass can have any row count, so a long-running server crept up by hundreds of MB. Padded to a
    few sizes, 300 row counts cost what 22 do."""

    def growth(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", MEMORY, mode], capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    assert growth("exact") > 100
    assert growth("padded") < 40
