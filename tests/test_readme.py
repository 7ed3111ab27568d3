"""Tier 3: the README's curl, openai SDK and LangChain examples, run as written against a server started
from the shipped config.yaml (no API key, the default system prompt) on the tiny model. Only the port
differs."""

import contextlib
import io
import json
import re
import subprocess

import pytest

from tests.conftest import ROOT, served
from tests.openai_schema import validate

pytestmark = pytest.mark.server

README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def readme_server(tiny_model_dir, tmp_path_factory):
    with served(tmp_path_factory, "readme", None, ("--config", "config.yaml", "--model", str(tiny_model_dir))) as srv:
        yield srv


def at(server, code: str) -> str:
    assert "http://127.0.0.1:8000" in code
    return code.replace("http://127.0.0.1:8000", server.base_url)


def test_curl_examples(readme_server):
    curls = [b for b in blocks("sh") if b.startswith("curl")]
    assert len(curls) == 7  # chat, streamed, legacy completions, Responses, Anthropic messages, tokenize, Ollama
    plain = subprocess.run(["bash", "-c", at(readme_server, curls[0])], capture_output=True, text=True, check=True)
    body = json.loads(plain.stdout)
    validate(body, "CreateChatCompletionResponse")
    assert body["model"] == "phi-3.5-mini-instruct"
    streamed = subprocess.run(["bash", "-c", at(readme_server, curls[1])], capture_output=True, text=True, check=True)
    frames = [line.removeprefix("data: ") for line in streamed.stdout.splitlines() if line]
    assert frames[-1] == "[DONE]"
    for frame in frames[:-1]:
        validate(json.loads(frame), "CreateChatCompletionStreamResponse")
    assert json.loads(frames[-2])["usage"]["completion_tokens"] >= 1
    legacy = subprocess.run(["bash", "-c", at(readme_server, curls[2])], capture_output=True, text=True, check=True)
    body = json.loads(legacy.stdout)
    validate(body, "CreateCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["tokens"]) >= 1 for c in body["choices"])
    response = json.loads(subprocess.run(["bash", "-c", at(readme_server, curls[3])], **RUN).stdout)
    validate(response, "Response")
    assert response["output"][0]["type"] == "message" and response["usage"]["output_tokens"] >= 1
    message = json.loads(subprocess.run(["bash", "-c", at(readme_server, curls[4])], **RUN).stdout)
    assert (message["type"], message["content"][0]["type"]) == ("message", "text")
    assert message["usage"]["output_tokens"] >= 1
    counted = json.loads(subprocess.run(["bash", "-c", at(readme_server, curls[5])], **RUN).stdout)
    assert counted["count"] == len(counted["tokens"]) > 0
    chat = json.loads(subprocess.run(["bash", "-c", at(readme_server, curls[6])], **RUN).stdout)
    assert (chat["done"], chat["message"]["role"]) == (True, "assistant") and chat["eval_count"] >= 1


RUN = {"capture_output": True, "text": True, "check": True}


@pytest.mark.parametrize("which", range(6))
def test_python_examples(readme_server, which):
    code = blocks("python")[which]
    assert len(blocks("python")) == 6  # openai, LangChain, tools and structured output, Responses, anthropic, ollama
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(at(readme_server, code), f"README-python-{which}", "exec"), {})
    assert out.getvalue().count("\n") >= 2  # two answers
