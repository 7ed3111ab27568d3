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
    top_k: int = 0  # 0 = off
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


def top_k_filter(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (k <= 0: keep all). logits: [B, V]."""
    vocab = logits.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (ks - 1).unsqueeze(-1))  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


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
    scaled = logits[rows] / temps.unsqueeze(-1)
    if any(params[i].top_k > 0 for i in rows):
        scaled = top_k_filter(scaled, [params[i].top_k for i in rows])
    probs = torch.softmax(scaled, dim=-1)
    if (top_ps < 1.0).any():
        probs = top_p_filter(probs, top_ps)
    for j, i in enumerate(rows):
        out[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
    return out
