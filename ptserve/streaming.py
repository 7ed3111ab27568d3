"""Response bodies: SSE chunks for `stream: true`, the chat.completion object otherwise.

Streaming rules (OpenAI's): one `id` and one `created` for every chunk; the first chunk carries
`delta.role = "assistant"`; exactly one chunk carries `finish_reason`; with
`stream_options.include_usage` every chunk has `"usage": null` and one last chunk brings
`choices: []` and the usage; the stream ends with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

DONE = "data: [DONE]\n\n"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chat_completion(
    cid: str, created: int, model: str, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


@dataclass
class ChunkWriter:
    model: str
    include_usage: bool = False
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return sse(body)

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    def role(self) -> str:
        return self._chunk(self._choice({"role": "assistant", "content": ""}))

    def content(self, text: str) -> str:
        return self._chunk(self._choice({"content": text}))

    def finish(self, reason: str) -> str:
        return self._chunk(self._choice({}, reason))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens))
