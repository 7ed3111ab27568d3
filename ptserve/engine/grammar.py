"""Grammar-constrained decoding, per row (llguidance).

The worker builds one `GrammarBackend` from the tokenizer and hands it to the engine; the engine asks
it for a `Matcher` per constrained sequence. Each step, constrained rows get a bitmask of the tokens
their grammar allows next (the other rows are untouched), the sampled token is fed back, and a row
whose grammar is complete stops.

Why llguidance: in a 16-request batch on a 32k vocabulary, its masks cost 1.1 ms per step (p50) here,
against 2.4 ms for xgrammar and 84 ms for outlines-core (`bench/grammar.py`), it compiles a schema in
about a millisecond with no warm-up, and its Lark dialect embeds JSON schemas (`%json`), which the
tool-call grammars need.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-next-token bits into bitmask[row] (int32, CPU, contiguous)."""
        view = bitmask[row]
        self._m.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def consume(self, token: int) -> bool:
        return bool(self._m.consume_token(token))

    @property
    def stopped(self) -> bool:
        """The grammar is complete (it allowed only EOS, or nothing can follow)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))

    def matcher(self, lark: str) -> Matcher:
        grammar = self._ll.grammar_from("lark", lark)
        m = self._ll.LLMatcher(self._tokenizer, grammar)
        if m.is_error():
            raise ValueError(f"grammar does not compile: {m.get_error()}")
        return Matcher(m)

    def bitmask(self, rows: int, pinned: bool = False) -> torch.Tensor:
        """A mask for `rows` rows, every token allowed; `pinned`: in pinned memory (a GPU's copy of it does
        not wait for the work queued before it)."""
        return torch.full((rows, self.words), -1, dtype=torch.int32, pin_memory=pinned)


_BITS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (changed in place): tokens whose bit is 0 get -inf. bitmask [R, ceil(V/32)] int32."""
    bitmask = bitmask.to(logits.device, non_blocking=True)
    bits = _BITS.get(logits.device)
    if bits is None:
        bits = _BITS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1  # [R, W, 32]
    allowed = allowed.reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill_(allowed == 0, float("-inf"))
