"""Sampling settings and pure torch functions that turn logits into next tokens.

Everything works on a batch of rows, each with its own settings, so one request's temperature, top_p
or seed never touches another's: logits [B, V] -> token ids [B].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0 (argmax), as OpenAI does for temperature 0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A per-request RNG: the same seed gives the same text, whatever else runs beside it."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero out the tail beyond cumulative probability top_p, per row.

    probs: [B, V] (rows sum to 1); top_p: [B]. The most likely token always survives.
    """
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p.
    drop = (cumulative - sorted_probs) >= top_p.unsqueeze(-1)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """logits: [B, V] -> next token ids [B], each row by its own params and generator."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    top_ps = torch.tensor([params[i].top_p for i in rows], device=logits.device)
    probs = torch.softmax(logits[rows] / temps.unsqueeze(-1), dim=-1)
    if (top_ps < 1.0).any():
        probs = top_p_filter(probs, top_ps)
    for j, i in enumerate(rows):
        out[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
    return out
