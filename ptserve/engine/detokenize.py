"""UTF-8-safe incremental detokenization and stop-string hold-back.

`TextStream.add(token_id)` returns the text that is safe to show now. Text is held back while:
- the last tokens end inside a multi-byte character (decoding shows U+FFFD), or
- the tail of the text could be the start of a stop string.
A stop string found in the text ends the stream; it and everything after it are never returned.
Joined, the returned pieces equal `tokenizer.decode(ids, skip_special_tokens=True)` (up to the stop).
"""

from __future__ import annotations

import functools

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a window of recent ids and emits the difference (the approach of vLLM and TGI).

    Decoding from an earlier offset keeps the leading-space handling of SentencePiece-style
    tokenizers right: the window's first token is never the one being emitted.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._rust = rust_decoder(tokenizer)
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:
            return self._rust(ids, skip_special_tokens=self._skip)
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end decodes as U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT)):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


def rust_decoder(tokenizer):
    """The `tokenizers` library's own decode where transformers' `decode` (without clean-up) is exactly it
    (a fast tokenizer whose class keeps transformers' `_decode`): the same text without transformers'
    argument handling, which cost more than the decoding itself (two calls a token, every token of every
    stream, on the worker's event loop). None otherwise."""
    if not _decodes_in_rust(type(tokenizer)):
        return None
    return getattr(getattr(tokenizer, "_tokenizer", None), "decode", None)


@functools.cache
def _decodes_in_rust(kind: type) -> bool:
    """Whether tokenizers of class `kind` decode exactly as their `tokenizers` backend (decided once a class,
    not for every request)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # (another transformers layout: its decode)
        return False
    return (
        issubclass(kind, TokenizersBackend)
        and kind._decode is TokenizersBackend._decode
        and kind.decode is PreTrainedTokenizerBase.decode
    )


class StopMatcher:
    """Finds stop strings across chunk boundaries, holding back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that was hit (the earliest in the text)

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        buf = self._held + text
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            at, self.matched = min(hits)
            return buf[:at], True
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Token ids in, safe text out, with stop strings applied."""

    def __init__(self, tokenizer, stops: list[str] | None = None):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops or [])
        self.stopped = False

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stops.matched if self.stopped else None

    def add(self, token_id: int) -> str:
        text, self.stopped = self._stops.feed(self._detok.add(token_id))
        return text

    def finish(self) -> str:
        """Release held text when generation ends for another reason (EOS, length)."""
        text, self.stopped = self._stops.feed(self._detok.flush())
        return text if self.stopped else text + self._stops.flush()


class TokenNames:
    """Token ids -> the strings and UTF-8 bytes that log-probability records show.

    SentencePiece-style vocabularies (Phi-3.5's): "▁" is a space and "<0xNN>" a single byte. A token
    that is part of a multi-byte character has a `token` string with U+FFFD; its `bytes` are exact,
    and joined they decode to the text.
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def name(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            piece = self._tok.convert_ids_to_tokens(token_id)
            if piece is None:  # past the tokenizer (Phi-3.5's padded embedding rows): no text
                raw = b""
            elif token_id in self._special:
                raw = piece.encode()
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            else:
                raw = piece.replace("▁", " ").encode()
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return found

    def record(self, token_id: int, logprob: float | None, top=()) -> dict:
        """One ChatCompletionTokenLogprob; logprob None = nothing predicted it (a prompt's first token)."""
        token, raw = self.name(token_id)
        return {
            "token": token,
            "logprob": logprob,
            "bytes": raw,
            "top_logprobs": None if logprob is None else [self._alt(t, lp) for t, lp in top],
        }

    def _alt(self, token_id: int, logprob: float) -> dict:
        token, raw = self.name(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}
