"""The chat page at `/`: the tutorial's "Assistente Virtual" box without Gradio.

One HTML page (`static/index.html`, inline CSS and JS) into which `render` inlines the server's settings
(a JSON block) and the vendored libraries that render answers safely: marked (Markdown), DOMPurify
(sanitising) and highlight.js (code), from `static/vendor/` (versions, licences and how to update them:
`static/vendor/README.md`). Inlined rather than served: one request, no CDN, works offline, and no
route beyond `/`. The page keeps conversations in the browser, streams answers from
/v1/chat/completions and reports tokens, speed and the context used against the model's window.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from ptserve.config import Config

STATIC = Path(__file__).resolve().parent / "static"
PAGE = STATIC / "index.html"
VENDOR = ("marked.min.js", "purify.min.js", "highlight.min.js")  # load order: the page's script uses all three
CONFIG_PLACEHOLDER = "__PTSERVE_CONFIG__"
VENDOR_PLACEHOLDER = "__PTSERVE_VENDOR__"
# Inside <script>, "</script" ends the element and "<!--" can make the parser skip the real end tag.
UNSAFE_IN_SCRIPT = re.compile(r"</script|<!--", re.IGNORECASE)


@cache
def _template() -> str:
    return PAGE.read_text(encoding="utf-8")


@cache
def _vendor_scripts() -> str:
    scripts = []
    for name in VENDOR:
        js = (STATIC / "vendor" / name).read_text(encoding="utf-8")
        if UNSAFE_IN_SCRIPT.search(js):
            raise RuntimeError(f"static/vendor/{name} is not safe to inline; re-vendor it with static/vendor/vendor.py")
        scripts.append(f"<script>{js}</script>")
    return "\n".join(scripts)


def render(config: Config, context_length: int | None = None) -> str:
    """The page for this server. `context_length` is the model's window as the engine resolved it (the
    config's `model.max_context_length` when not given; null makes the page show usage without a limit)."""
    settings = {
        "model": config.model.served_name,
        "system_prompt": config.system_prompt,
        "temperature": config.generation.temperature,
        "top_p": config.generation.top_p,
        "max_tokens": config.generation.max_tokens,
        "context_length": context_length if context_length is not None else config.model.max_context_length,
        "auth": bool(config.server.api_keys),
    }
    # Every "<" escaped: no "</script>" or "<!--" from a system prompt can end or derail the block (still JSON).
    data = json.dumps(settings, ensure_ascii=False).replace("<", "\\u003c")
    parts = {CONFIG_PLACEHOLDER: data, VENDOR_PLACEHOLDER: _vendor_scripts()}
    # One pass: text that a substitution brings in is never searched for the other placeholder.
    return re.sub("|".join(parts), lambda m: parts[m.group(0)], _template())
