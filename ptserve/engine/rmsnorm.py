"""transformers' RMSNorm layers computed by torch's fused kernel on a GPU.

transformers' Phi-3 RMSNorm is eight tensor operations (to float32, pow, mean, add, rsqrt, mul, to the
model's dtype, mul by the weight), each a kernel launch on a GPU: two norms a layer are 16 of a decoding
pass's ~45 launches a layer (H100 profile, bench/results/h100-2026-11-27.json: ~1,400 a pass), and a launch
costs more host time there than the GPU spends on it. `torch.nn.functional.rms_norm` is one fused kernel
on CUDA (`aten._fused_rms_norm`): the same normalisation in float32, the weight applied before the one
rounding to the model's dtype (transformers rounds before applying it: results differ by a rounding, at
most). On the CPU it measured no faster (bench512 and the cheap shape, 1 to 64 rows): the loader fuses on
CUDA only. Like the linear layers re-packed for oneDNN on the CPU (cpu_linear.py), the model's code stays
transformers': only these modules' forward is swapped, and `unfuse` puts it back (bench/engine_step.py
times both).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _is_rms_norm(module: torch.nn.Module) -> bool:
    """transformers' RMSNorm of this form: `weight * normalized(x)` with `variance_epsilon`."""
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight if self.weight.dtype == hidden_states.dtype else self.weight.to(hidden_states.dtype)
    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), weight, self.variance_epsilon)


def fuse(model: torch.nn.Module) -> int:
    """Swap every RMSNorm's forward for the fused kernel; returns how many."""
    count = 0
    for module in model.modules():
        if _is_rms_norm(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def unfuse(model: torch.nn.Module) -> int:
    """Give every fused RMSNorm transformers' forward back; returns how many."""
    count = 0
    for module in model.modules():
        if _is_rms_norm(module) and "forward" in vars(module):
            del module.forward
            count += 1
    return count
