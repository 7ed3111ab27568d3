"""Tier 3: the chat page at / in headless Chromium (Debian's, driven by playwright), against the real
server: the API key, streamed answers identical to the API's with their usage, stop (the engine frees the
sequence), edit-and-resend, regenerate, conversations kept across reloads (switch, rename, delete,
export, import), the context window, errors in words, English, dark mode and a phone-width screen.

Crafted responses (playwright's `page.route`) stand in for the server only for what a random-weight
model or a loaded server cannot produce: specific Markdown and HTML, a 503 while loading, a 429."""

from __future__ import annotations

import html.parser
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

from ptserve import chatpage
from ptserve.config import Config
from tests.conftest import API_KEY, served, wait_gauge

pytestmark = pytest.mark.server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SYSTEM = "Seja breve <!--<script> </script> e gentil."  # none of it may end or derail the page's config block
WINDOW = 2048
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COMPLETIONS = "**/v1/chat/completions"
DONE = "document.querySelectorAll('.assistant')[{n}]?.dataset.done"


def endless_model(source: Path, dest: Path) -> Path:
    """The tiny model with its special tokens' lm_head rows zeroed: greedy decoding never picks EOS, so a
    long answer runs long enough to be stopped, and every answer has exactly max_tokens tokens."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(source, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    weights = load_file(dest / "model.safetensors")
    weights["lm_head.weight"][tok.all_special_ids + tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])] = 0
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def page_server(tiny_model_dir, tmp_path_factory):
    model = endless_model(tiny_model_dir, tmp_path_factory.mktemp("page-model") / "model")
    text = f"model:\n  id: {model}\n  max_context_length: {WINDOW}\nsystem_prompt: '{SYSTEM}'\n"
    with served(tmp_path_factory, "page", text, ("--api-key", API_KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, page_server):
    """A fresh browser profile (empty localStorage) on the page; with `key`, the API key already saved."""
    contexts = []

    def open_(key: str | None = API_KEY, **context_args):
        context = browser.new_context(**context_args)
        contexts.append(context)
        if key:
            context.add_init_script(
                f"localStorage.getItem('ptserve-api-key') || localStorage.setItem('ptserve-api-key', {key!r})"
            )
        page = context.new_page()
        page.goto(page_server.base_url + "/")
        return page

    yield open_
    for context in contexts:
        context.close()


def api(server, messages, max_tokens) -> dict:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": "m", "messages": messages, "temperature": 0, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def settings(page, **fields) -> None:
    """Fill the settings dialog: field ids with "-" written as "_"."""
    page.click("#settings-open")
    for name, value in fields.items():
        page.fill("#" + name.replace("_", "-"), str(value))
    page.click("#settings-close")


def ask(page, text: str, nth: int):
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(DONE.format(n=nth), timeout=60_000)
    return page.locator(".assistant").nth(nth)


def stored(page) -> list[dict]:
    """The current conversation's messages as the page keeps them in localStorage."""
    return page.evaluate(
        """() => {
            const all = JSON.parse(localStorage.getItem('ptserve-conversations') || '[]');
            const id = localStorage.getItem('ptserve-current');
            return (all.find((c) => c.id === id) || {messages: []}).messages;
        }"""
    )


def turns(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def titles(page) -> list[str]:
    return page.locator(".conv-open").all_inner_texts()


def sse(parts: list[str], prompt_tokens: int, completion_tokens: int) -> str:
    """A chat completion stream as the server writes it, with include_usage."""
    base = {"id": "chatcmpl-crafted", "object": "chat.completion.chunk", "created": 0, "model": "phi-3.5-mini-instruct"}

    def chunk(delta, finish=None):
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}

    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in parts]
    events.append(chunk({}, "stop"))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    events.append({**base, "choices": [], "usage": {**usage, "total_tokens": prompt_tokens + completion_tokens}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def error_body(message: str, code: str, type_: str) -> str:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def test_render_keeps_config_and_libraries_inside_their_scripts():
    config = Config.model_validate({"system_prompt": SYSTEM, "model": {"max_context_length": 4096}})
    page = chatpage.render(config)

    class Scripts(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.scripts: list[tuple[dict, str]] = []
            self._attrs = None

        def handle_starttag(self, tag, attrs):
            if tag == "script":
                self._attrs = dict(attrs)

        def handle_data(self, data):
            if self._attrs is not None:
                self.scripts.append((self._attrs, data))
                self._attrs = None

    parser = Scripts()
    parser.feed(page)
    assert [a.get("id") for a, _ in parser.scripts] == ["ptserve-config", None, None, None, None]
    data = json.loads(parser.scripts[0][1])
    assert data == {
        "model": "phi-3.5-mini-instruct",
        "system_prompt": SYSTEM,
        "temperature": 0.1,
        "top_p": 1.0,
        "max_tokens": 500,
        "context_length": 4096,
        "auth": False,
    }
    banners = ["marked v18.2.1", "DOMPurify 3.4.18", "Highlight.js v11.12.0"]
    assert [banner in script[:300] for banner, (_, script) in zip(banners, parser.scripts[1:4], strict=True)] == [
        True
    ] * 3
    # The engine's window, when api.py passes it, wins over the config's (null there: the model's own).
    block = re.search(r'id="ptserve-config" type="application/json">(.*?)</script>', chatpage.render(Config(), 131072))
    assert json.loads(block.group(1))["context_length"] == 131072


def test_api_key_send_stream_usage_and_stop(page_server, open_page):
    page = open_page(key=None)
    assert page.title() == "Assistente Virtual"
    assert page.text_content("#system-shown") == SYSTEM
    assert page.text_content("#auth-message") == "Este servidor exige uma chave da API."
    settings(page, temperature=0, max_tokens=12)

    # No key yet: nothing is sent, the question waits in the box.
    page.fill("#input", "Olá")
    page.press("#input", "Enter")
    assert page.text_content("#auth-message") == "Informe a chave da API para enviar mensagens."
    assert page.input_value("#input") == "Olá" and page.locator(".msg").count() == 0

    # A wrong key: the refusal in words; the question stays in the conversation.
    page.fill("#api-key", "wrong")
    page.click("#api-key-save")
    page.press("#input", "Enter")
    page.wait_for_selector(".error[data-done]", timeout=60_000)
    assert page.get_attribute(".error", "data-status") == "401"
    assert page.text_content(".error-text") == "O servidor recusou a chave da API. Informe a chave correta acima."
    refusal = httpx.post(page_server.base_url + "/v1/chat/completions", json={}, headers={"Authorization": "Bearer x"})
    assert page.text_content(".error-detail") == "Mensagem do servidor: " + refusal.json()["error"]["message"]
    assert page.is_visible("#auth") and page.locator(".error .retry").count() == 0
    assert stored(page) == [{"role": "user", "content": "Olá"}]

    # The right key: saving it sends the waiting question again, and the answer streams in.
    page.fill("#api-key", API_KEY)
    page.click("#api-key-save")
    page.wait_for_function(DONE.format(n=0), timeout=60_000)
    assert page.is_hidden("#auth") and page.locator(".error").count() == 0
    expected = api(page_server, [{"role": "user", "content": "Olá"}], 12)
    answer = page.locator(".assistant").nth(0)
    assert turns(stored(page)) == [
        {"role": "user", "content": "Olá"},
        {"role": "assistant", "content": expected["choices"][0]["message"]["content"]},
    ]
    prompt = expected["usage"]["prompt_tokens"]
    assert answer.get_attribute("data-tokens") == "12"
    assert answer.get_attribute("data-prompt-tokens") == str(prompt)
    stats = answer.locator(".stats").inner_text()
    # tokens that arrive together (one message from the worker) can make the rate thousands: grouped digits
    assert re.fullmatch(
        rf"12 tokens · \d{{1,3}}(\.\d{{3}})*,\d tokens/s · 1º token em \d+,\d\d s · contexto {prompt + 12}/2\.048",
        stats,
    )
    assert page.text_content("#context-text") == (
        f"Contexto: {prompt + 12} de 2.048 tokens ({round(100 * (prompt + 12) / WINDOW)}%)"
    )

    # The conversation goes back with the next question.
    ask(page, "E depois?", 1)
    history = [*turns(stored(page))[:2], {"role": "user", "content": "E depois?"}]
    assert stored(page)[3]["content"] == api(page_server, history, 12)["choices"][0]["message"]["content"]

    # Stop: a long answer, stopped once it is streaming; the server frees the sequence.
    settings(page, max_tokens=1800)
    page.fill("#input", "Conte uma longa história.")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.assistant')[2]?.textContent.length > 0", timeout=60_000)
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_selector(".assistant.stopped[data-done='stopped']", timeout=60_000)
    assert wait_gauge(page_server, "ptserve_running_sequences", 0) == 0
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    assert page.locator(".assistant").nth(2).locator(".stats").inner_text().startswith("interrompida · 1º token em ")
    last = stored(page)[-1]
    assert last["stopped"] is True and len(last["content"]) > 0
    assert page.evaluate("localStorage.getItem('ptserve-api-key')") == API_KEY


def test_edit_regenerate_reload_and_the_conversation_list(page_server, open_page, tmp_path):
    page = open_page()
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    settings(page, temperature=0, max_tokens=8)
    ask(page, "Olá", 0)
    ask(page, "E depois?", 1)

    # Edit the first question and send it again: what followed it goes, a new answer comes.
    page.click(".msg.user[data-index='0'] .edit")
    page.fill(".edit-box", "Oi")
    page.press(".edit-box", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.assistant').length === 1 && {DONE.format(n=0)}")
    oi = api(page_server, [{"role": "user", "content": "Oi"}], 8)["choices"][0]["message"]["content"]
    assert turns(stored(page)) == [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": oi}]
    assert sent[-1]["messages"] == [{"role": "user", "content": "Oi"}]

    # Regenerate: the last answer asked for again (greedy: the same text), still one answer.
    page.click(".regenerate")
    page.wait_for_function(f"document.querySelectorAll('.assistant').length === 1 && {DONE.format(n=0)}")
    assert len(sent) == 4 and sent[-1]["messages"] == [{"role": "user", "content": "Oi"}]
    assert sent[-1]["stream_options"] == {"include_usage": True} and sent[-1]["max_tokens"] == 8
    assert turns(stored(page)) == [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": oi}]

    # A reload keeps the conversation.
    page.reload()
    assert page.locator(".msg.user .body").all_inner_texts() == ["Oi"]
    assert page.locator(".assistant").count() == 1 and page.get_attribute(".assistant", "data-tokens") == "8"
    assert titles(page) == ["Oi"]

    # A second conversation, then back to the first.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.inner_text(".empty") == "Envie uma mensagem para começar."
    ask(page, "Segunda conversa", 0)
    assert titles(page) == ["Segunda conversa", "Oi"]
    page.click(".conv-open >> text=Oi")
    assert page.locator(".msg.user .body").all_inner_texts() == ["Oi"]

    # Rename, export, delete, import.
    page.click(".conv:has(.conv-open:text-is('Oi')) .conv-rename")
    page.fill(".conv-title-input", "Saudações")
    page.press(".conv-title-input", "Enter")
    assert titles(page) == ["Segunda conversa", "Saudações"]
    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["format"] == "ptserve-conversations" and data["version"] == 1
    assert [c["title"] for c in data["conversations"]] == ["", "Saudações"]
    assert [turns(c["messages"])[0]["content"] for c in data["conversations"]] == ["Segunda conversa", "Oi"]

    page.once("dialog", lambda dialog: dialog.accept())
    page.click(".conv:has(.conv-open:text-is('Saudações')) .conv-delete")
    assert titles(page) == ["Segunda conversa"]
    assert page.locator(".msg.user .body").all_inner_texts() == ["Segunda conversa"]

    page.set_input_files("#import-file", str(exported))
    page.wait_for_function("document.querySelectorAll('.conv').length === 3")
    assert sorted(titles(page)) == ["Saudações", "Segunda conversa", "Segunda conversa"]
    assert page.inner_text("#notice") == "2 conversa(s) importada(s)."
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"messages": [{"role": "hacker", "content": 1}]}]}')
    page.set_input_files("#import-file", str(bad))
    page.wait_for_function("document.getElementById('notice').textContent.startsWith('Não foi')")
    assert (
        page.inner_text("#notice") == "Não foi possível importar: o arquivo não tem uma lista de conversas do ptserve"
    )
    assert page.locator(".conv").count() == 3


MARKDOWN = (
    "## Resultado\n\nUm **negrito** e `código`.\n\n| nome | valor |\n|---|---:|\n| a | 1 |\n\n"
    "```python\ndef soma(a, b):\n    return a + b\n```\n\n"
    "<script>window.pwned = 1</script>\n\n"
    'Texto <img src=x onerror="window.pwned = 2"> e [clique](javascript:window.pwned=3).'
)


def test_markdown_code_and_no_html_from_the_model(page_server, open_page):
    page = open_page(permissions=["clipboard-read", "clipboard-write"])
    bodies = []

    def crafted(route):
        bodies.append(route.request.post_data_json)
        parts = [MARKDOWN[i : i + 9] for i in range(0, len(MARKDOWN), 9)]
        route.fulfill(status=200, content_type="text/event-stream", body=sse(parts, 30, 7))

    page.route(COMPLETIONS, crafted)
    answer = ask(page, "Mostre Markdown", 0)
    body = answer.locator(".body")
    assert body.locator("h2").inner_text() == "Resultado"
    assert body.locator("strong").inner_text() == "negrito"
    assert body.locator("th").all_inner_texts() == ["nome", "valor"]
    assert body.locator("td").all_inner_texts() == ["a", "1"]
    assert body.locator(".code-lang").inner_text() == "python"
    assert body.locator("pre code").text_content() == "def soma(a, b):\n    return a + b\n"
    assert body.locator(".hljs-keyword").all_inner_texts() == ["def", "return"]
    assert body.locator(".hljs-title").inner_text() == "soma"

    # The model's HTML is text on the page, never markup: nothing of it runs or loads.
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert body.locator("script, img, [onerror]").count() == 0
    assert body.locator(".raw").inner_text() == "<script>window.pwned = 1</script>"
    assert 'Texto <img src=x onerror="window.pwned = 2"> e clique.' in body.inner_text()
    assert body.locator("a").get_attribute("href") is None
    body.locator("a").click()
    assert page.evaluate("window.pwned") is None

    assert answer.get_attribute("data-tokens") == "7"
    assert answer.locator(".stats").inner_text().startswith("7 tokens · ")
    assert page.text_content("#context-text") == "Contexto: 37 de 2.048 tokens (2%)"
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["messages"] == [{"role": "user", "content": "Mostre Markdown"}]
    assert (bodies[0]["temperature"], bodies[0]["top_p"], bodies[0]["max_tokens"]) == (0.1, 1.0, 500)

    # Copy the code block, then the whole answer (its Markdown source).
    body.locator(".copy-code").click()
    assert page.evaluate("navigator.clipboard.readText()") == "def soma(a, b):\n    return a + b\n"
    assert body.locator(".copy-code span").inner_text() == "Copiado!"
    answer.locator(".actions .copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN

    # A structured-output request: the schema goes as response_format, the answer shows as a JSON block.
    page.click("#settings-open")
    page.select_option("#response-format", "json_schema")
    page.fill("#json-schema", '{"type": "object", "properties": {"nome": {"type": "string"}}}')
    page.click("#settings-close")
    page.unroute(COMPLETIONS)
    page.route(
        COMPLETIONS,
        lambda r: r.fulfill(status=200, content_type="text/event-stream", body=sse(['{"nome": "Ana"}'], 40, 6)),
    )
    answer = ask(page, "Seu nome em JSON", 1)
    assert answer.locator(".code-lang").inner_text() == "json"
    assert answer.locator("pre code").text_content() == '{"nome": "Ana"}\n'


def test_errors_in_words_with_retry(page_server, open_page):
    page = open_page()
    settings(page, temperature=0, max_tokens=8)
    calls = []

    def loading_then_real(route):
        calls.append(1)
        if len(calls) == 1:
            message = "The model is still loading. Retry after 2 s (GET /health says 200 when it is ready)."
            headers = {"Retry-After": "2"}
            route.fulfill(
                status=503,
                headers=headers,
                content_type="application/json",
                body=error_body(message, "model_loading", "server_error"),
            )
        else:
            route.continue_()

    # 503 while loading: said in words, retried by itself after Retry-After, then the real answer.
    page.route(COMPLETIONS, loading_then_real)
    page.fill("#input", "Olá")
    page.press("#input", "Enter")
    page.wait_for_selector(".error[data-kind='loading']")
    assert page.text_content(".error-text") == "O modelo ainda está carregando."
    assert page.text_content(".error-detail") == (
        "Mensagem do servidor: The model is still loading. Retry after 2 s (GET /health says 200 when it is ready)."
    )
    assert page.get_attribute(".error", "data-retry-after") == "2"
    assert re.fullmatch(r"Nova tentativa automática em [12] s\.", page.text_content(".retry-info"))
    page.wait_for_function(DONE.format(n=0), timeout=60_000)
    assert len(calls) == 2 and page.locator(".error").count() == 0
    expected = api(page_server, [{"role": "user", "content": "Olá"}], 8)["choices"][0]["message"]["content"]
    assert stored(page)[1]["content"] == expected
    page.unroute(COMPLETIONS)

    # 429: said in words; "Tentar de novo" goes at once (and the automatic retry does not go as well).
    calls.clear()

    def busy_then_real(route):
        calls.append(1)
        if len(calls) == 1:
            route.fulfill(
                status=429,
                headers={"Retry-After": "30"},
                content_type="application/json",
                body=error_body("Too many requests queued; retry shortly.", "rate_limit", "rate_limit_error"),
            )
        else:
            route.continue_()

    page.route(COMPLETIONS, busy_then_real)
    page.click(".regenerate")
    page.wait_for_selector(".error[data-kind='429']")
    assert page.text_content(".error-text") == "O servidor está ocupado com muitos pedidos agora."
    assert page.text_content(".retry-info") == "Nova tentativa automática em 30 s."
    page.click(".error .retry")
    page.wait_for_function(DONE.format(n=0), timeout=60_000)
    assert len(calls) == 2 and stored(page)[1]["content"] == expected
    page.unroute(COMPLETIONS)

    # Outgrowing the window: the page says so before sending, and the server's 400 is explained after.
    settings(page, max_tokens=2048)
    used = int(page.get_attribute("#context", "data-used"))
    assert page.get_attribute("#context-warning", "data-level") == "over"
    assert page.text_content("#context-warning") == (
        f"A próxima resposta não cabe: a conversa ocupa cerca de {used} tokens e a resposta pode ter até 2.048 "
        "(Máx. tokens), mais que os 2.048 tokens da janela do modelo. Comece uma nova conversa, edite uma mensagem "
        "anterior ou reduza Máx. tokens nas configurações."
    )
    page.fill("#input", "Mais uma")
    page.press("#input", "Enter")
    page.wait_for_selector(".error[data-kind='context']", timeout=60_000)
    history = turns(stored(page))  # the unanswered question stays in the conversation, for a retry
    assert history[-1] == {"role": "user", "content": "Mais uma"}
    prompt = api(page_server, history, 1)["usage"]["prompt_tokens"]
    assert page.text_content(".error-text") == (
        "A conversa não cabe na janela de contexto do modelo. Comece uma nova conversa, edite uma mensagem anterior "
        "ou reduza Máx. tokens nas configurações."
    )
    assert page.text_content(".error-detail") == (
        f"Mensagem do servidor: This model's maximum context length is 2048 tokens. However, you requested "
        f"{prompt + 2048} tokens ({prompt} in the messages, 2048 in the completion). Please reduce the length of the "
        "messages or completion."
    )
    assert page.locator(".error .retry").count() == 0

    # Nearly full: a long draft with room left for the answer warns that the end is near.
    settings(page, max_tokens=50)
    page.fill("#input", "palavra " * 600)
    used = int(page.get_attribute("#context", "data-used"))
    assert 0.8 * WINDOW <= used and used + 50 <= WINDOW
    assert page.get_attribute("#context-warning", "data-level") == "near"
    assert page.text_content("#context-warning") == (
        f"Esta conversa já ocupa {round(100 * used / WINDOW)}% da janela de contexto do modelo (2.048 tokens). "
        "Em breve ela não caberá: comece uma nova conversa ou edite uma mensagem anterior."
    )


def test_english_dark_mode_phone_width_and_labels(page_server, open_page):
    page = open_page(viewport={"width": 390, "height": 844}, color_scheme="light")

    # Phone width: the list is off-screen until the menu button opens it; Escape closes it.
    assert page.evaluate("document.getElementById('sidebar').getBoundingClientRect().right") <= 0
    page.click("#open-sidebar")
    page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().left === 0")
    assert page.get_attribute("#open-sidebar", "aria-expanded") == "true"
    page.keyboard.press("Escape")
    page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().right <= 0")

    # Shift+Enter is a new line, not a send.
    page.click("#input")
    page.keyboard.type("a")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("b")
    assert page.input_value("#input") == "a\nb" and page.locator(".msg").count() == 0
    page.fill("#input", "")

    # Dark mode and English, both kept across a reload.
    page.click("#theme")
    page.select_option("#lang", "en")
    page.reload()
    assert page.get_attribute("html", "data-theme") == "dark" and page.get_attribute("#theme", "aria-pressed") == "true"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(13, 17, 23)"
    assert page.title() == "Virtual Assistant" and page.get_attribute("html", "lang") == "en"
    assert (
        page.get_attribute("#send", "aria-label") == "Send" and page.inner_text(".empty") == "Send a message to start."
    )
    settings(page, temperature=0, max_tokens=5)
    answer = ask(page, "Hi", 0)
    # (the decode speed is left out when all 5 tokens reached the page in one read: no time to divide by)
    assert re.fullmatch(
        r"5 tokens · (\d{1,3}(,\d{3})*\.\d tokens/s · )?first token in \d+\.\d\d s · context \d+/2,048",
        answer.locator(".stats").inner_text(),
    )

    # Every control has a name a screen reader can say.
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input, select, textarea')].filter((n) => {
            if (n.type === 'file') return false;  // opened by the labelled Import button
            const name = n.getAttribute('aria-label') || (n.labels && n.labels.length && n.labels[0].textContent.trim())
                || (n.tagName === 'BUTTON' && n.textContent.trim());
            return !name;
        }).map((n) => n.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []
