"""Tier 3: the chat page at / in headless Chromium (Debian's, driven by playwright), against the real
server: it shows the system prompt, sends the API key, streams answers identical to the API's, keeps
the conversation, and stops a generation (the engine frees the sequence)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, served, wait_gauge

pytestmark = pytest.mark.server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SYSTEM = "Seja breve </script> e gentil."  # "</script>" must not break the page's config block
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def endless_model(source: Path, dest: Path) -> Path:
    """The tiny model with its special tokens' lm_head rows zeroed: greedy decoding never picks EOS, so a
    long answer runs long enough to be stopped."""
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
    text = f"model:\n  id: {model}\n  max_context_length: 2048\nsystem_prompt: '{SYSTEM}'\n"
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


def api_answer(server, messages, max_tokens) -> str:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": "m", "messages": messages, "temperature": 0, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    return r.json()["choices"][0]["message"]["content"]


def ask(page, text: str, nth: int):
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.assistant')[{nth}]?.dataset.done", timeout=60_000)
    return page.locator(".assistant").nth(nth)


def test_chat_page_end_to_end(page_server, browser):
    page = browser.new_page()
    page.goto(page_server.base_url + "/")
    assert page.title() == "Assistente Virtual"
    assert page.inner_text("#system-prompt") == SYSTEM
    assert page.is_visible("#api-key")
    assert page.input_value("#temperature") == "0.1" and page.input_value("#max-tokens") == "500"

    # A wrong key: the API's message, and nothing kept in the conversation.
    page.fill("#api-key", "wrong")
    page.fill("#input", "Olá")
    page.click("#send")
    page.wait_for_selector(".error[data-done]", timeout=60_000)
    assert "Incorrect API key" in page.inner_text(".error")

    page.click("#clear")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    first = ask(page, "Olá", 0)
    assert first.get_attribute("data-done") == "true"
    expected = api_answer(page_server, [{"role": "user", "content": "Olá"}], 12)
    assert first.text_content() == expected  # streamed token by token, the same text

    second = ask(page, "E depois?", 1)
    history = [
        {"role": "user", "content": "Olá"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "E depois?"},
    ]
    assert second.text_content() == api_answer(page_server, history, 12)  # the conversation is kept

    # Stop: a long answer, stopped once it is streaming; the server frees the sequence.
    page.fill("#max-tokens", "1800")
    page.fill("#input", "Conte uma longa história.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.assistant')[2].textContent.length > 0", timeout=60_000)
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_selector(".assistant.stopped[data-done='stopped']", timeout=60_000)
    assert wait_gauge(page_server, "ptserve_running_sequences", 0) == 0
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    assert page.evaluate("localStorage.getItem('ptserve-api-key')") == API_KEY
    page.close()
