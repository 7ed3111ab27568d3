"""Screenshots of the chat page for the README: light and dark, desktop and phone width.

    .venv/bin/python docs/screenshots.py

Starts the real server on the tiny random-weight model (as the tests do), opens `/` in Debian's
chromium through playwright and writes docs/chat-page-*.png. The tiny model writes gibberish, so the
conversations on screen are seeded into the page's localStorage: the question, the answer and the
numbers in its stats line are illustrative; the layout, the Markdown and code rendering, the context
meter and the conversation list are the page's own.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import RunningServer  # noqa: E402 (after the path above)
from tests.test_chat_page import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

OUT = ROOT / "docs"
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}

ANSWER = """Você pode usar o módulo `csv` da biblioteca padrão:

```python
import csv

def soma_coluna(caminho: str, coluna: str) -> float:
    with open(caminho, newline="", encoding="utf-8") as f:
        return sum(float(linha[coluna]) for linha in csv.DictReader(f))

print(soma_coluna("vendas.csv", "valor"))
```

Para um arquivo assim:

| produto | valor |
|---|---:|
| café | 12,50 |
| pão | 8,00 |

a soma é **20,5**. Com *pandas*, `pd.read_csv("vendas.csv")["valor"].sum()` faz o mesmo."""


def conversations() -> list[dict]:
    def chat(id_, updated, question, answer, stats=None):
        reply = {"role": "assistant", "content": answer}
        if stats:
            reply["stats"] = stats
        messages = [{"role": "user", "content": question}, reply]
        return {"id": id_, "title": "", "created": updated, "updated": updated, "messages": messages}

    stats = {"prompt_tokens": 96, "completion_tokens": 212, "ttft_ms": 180, "tokens_per_s": 41.7}
    return [
        chat("c3", 3, "Como ler um CSV em Python e somar uma coluna?", ANSWER, stats),
        chat("c2", 2, "Resuma a reunião de ontem em três tópicos", "1. Prazos\n2. Orçamento\n3. Próximos passos"),
        chat("c1", 1, "Receita de pão de queijo", "Polvilho, queijo, ovos, leite e óleo."),
    ]


def shoot(browser, base_url: str, size: str, theme: str, sidebar: bool) -> Path:
    context = browser.new_context(viewport=SIZES[size], color_scheme=theme)
    seed = {"ptserve-conversations": json.dumps(conversations()), "ptserve-current": "c3", "ptserve-lang": "pt"}
    context.add_init_script(
        "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in seed.items())
    )
    page = context.new_page()
    page.goto(base_url + "/")
    if sidebar:
        page.click("#open-sidebar")
        page.wait_for_timeout(400)  # the slide-in transition
    path = OUT / f"chat-page-{size}-{theme}.png"
    page.screenshot(path=str(path))
    context.close()
    return path


def main() -> None:
    from playwright.sync_api import sync_playwright

    from ptserve.tinymodel import build

    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp) / "tiny")
        config = Path(tmp) / "config.yaml"
        config.write_text(f"model:\n  id: {model}\n  max_context_length: 4096\n")
        server = RunningServer(["--config", str(config)], log_path=Path(tmp) / "server.log")
        try:
            server.wait_ready()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                for size in SIZES:
                    for theme in ("light", "dark"):
                        path = shoot(browser, server.base_url, size, theme, sidebar=size == "phone" and theme == "dark")
                        print(path.relative_to(ROOT), path.stat().st_size, "bytes")
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
