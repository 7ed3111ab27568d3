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
