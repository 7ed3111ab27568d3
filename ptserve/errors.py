"""A few exception types and ONE mapping to the OpenAI error envelope.

{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# OpenAI answers client errors (400, 401, 404, ...) with type "invalid_request_error" and tells them
# apart by `code` ("invalid_api_key", "model_not_found", "context_length_exceeded").
_TYPES = {429: "rate_limit_error"}


@dataclass
class APIError(Exception):
    """An error the client can act on; `status` is the HTTP status."""

    message: str
    status: int = 400
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param, code)


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_body(exc: APIError) -> dict[str, Any]:
    return envelope(exc.status, exc.message, exc.param, exc.code)


RETRY_AFTER_S = 1  # what a 429 (the engine's queue is full) tells the client to wait
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away": never seen by that client
# The inference worker's typed failures (ptserve.job.FAILURES) -> status, code, param, the sentence a client reads.
_FAILURES = {
    "cancelled": (CLIENT_CLOSED_REQUEST, None, None, "The request was cancelled."),
    "queue_full": (429, "queue_full", None, "The server is busy: {detail}. Retry after {retry} s."),
    "never_fits": (
        400,
        "kv_cache_exceeded",
        "max_tokens",
        "This request can never fit the server: {detail}. Lower max_tokens, n or the prompt.",
    ),
    "engine_failed": (
        503,
        "engine_failed",
        None,
        "The inference engine has failed ({detail}); the server is restarting. Retry shortly.",
    ),
    "generation_failed": (500, None, None, "Generation failed: {detail}"),
    "worker_error": (500, None, None, "The inference worker failed on this request."),
}


def failure_error(message: dict[str, Any]) -> APIError:
    """A worker's {"failure": kind, "detail": ...} as the error a client gets."""
    status, code, param, text = _FAILURES[message["failure"]]
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return APIError(text.format(detail=message["detail"], retry=RETRY_AFTER_S), status, param, code, headers)
