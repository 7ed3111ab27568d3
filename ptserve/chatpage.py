"""The chat page at `/`: the tutorial's "Assistente Virtual" box without Gradio.

One static file (`static/index.html`, inline CSS and JS, no CDN) that keeps the conversation, streams
answers from /v1/chat/completions, shows the system prompt in use, can stop a generation and sends
the API key when the server requires one. The server's settings reach it as a JSON block in the page.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from ptserve.config import Config

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
PLACEHOLDER = "__PTSERVE_CONFIG__"


@cache
def _template() -> str:
    return PAGE.read_text(encoding="utf-8")


def render(config: Config) -> str:
    settings = {
        "model": config.model.served_name,
        "system_prompt": config.system_prompt,
        "temperature": config.generation.temperature,
        "max_tokens": config.generation.max_tokens,
        "auth": bool(config.server.api_keys),
    }
    # Inside <script>, "</" would end the block early: escape it (still valid JSON).
    data = json.dumps(settings, ensure_ascii=False).replace("</", "<\\/")
    return _template().replace(PLACEHOLDER, data)
