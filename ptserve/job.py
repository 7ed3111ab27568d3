"""What crosses from the HTTP process to the inference worker, and what comes back: token ids, settings and
typed outcomes. Nothing wire-shaped: no HTTP statuses, no envelopes (the dialects make those).

The worker's messages for one request: first {"accepted": True} or a failure; then, per engine read and
choice, {"index", "text", "completion_tokens", "finish_reason", "logprobs"?, "prompt_logprobs"?,
"stop_string"?}; a failure ends them. A failure is {"failure": KIND, "detail": str}, KIND one of FAILURES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ptserve.engine.sampling import SamplingParams

FAILURES = (
    "cancelled",  # cancelled while it waited for a worker
    "queue_full",  # the engine's queue is full: retry later
    "never_fits",  # more KV cache than the whole budget
    "engine_failed",  # the engine stopped for good
    "generation_failed",  # this request's generation failed (the engine serves on)
    "worker_error",  # the worker raised (a bug)
)


def failure(kind: str, detail: str) -> dict[str, Any]:
    if kind not in FAILURES:
        raise ValueError(f"unknown failure kind {kind!r}")
    return {"failure": kind, "detail": detail}


@dataclass
class Job:
    """What crosses to the inference worker: token ids and settings, nothing wire-shaped.

    Every prompt gets `n` sequences; choice index = prompt number x n + sequence number."""

    prompts: list[list[int]]
    params: SamplingParams
    stop: list[str]
    ignore_eos: bool = False
    n: int = 1
    request_id: str = "-"  # for the worker's log lines

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n
