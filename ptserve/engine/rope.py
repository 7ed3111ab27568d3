"""LongRoPE with its factors chosen once, from the served context length, not per forward pass.

transformers' LongRoPE (Phi-3/3.5) switches between the short and the long factors from the largest
position in the *batch* at every forward. In a continuous batch that couples requests: once any row (even
a padded position) passes `original_max_position_embeddings` (4096 for Phi-3.5), every row is rotated with
the long factors, and a sequence that crosses the boundary keeps short-factor keys in its cache beside
long-factor queries. vLLM picks the factors statically instead; so does this: the long factors when the
configured context is longer than the original one, the short ones otherwise. A row's numerics then
never depend on its neighbours, and no cache mixes factors. The attention scaling (from the model's
`max_position_embeddings` / original ratio) is transformers' own in both cases.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

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
