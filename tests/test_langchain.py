"""Tier 3: LangChain's ChatOpenAI(base_url=...) against the real server (tiny model)."""

import pytest
from langchain_openai import ChatOpenAI

from tests.conftest import API_KEY

pytestmark = pytest.mark.server

QUESTION = "Qual é a capital do Brasil?"


@pytest.fixture(scope="module")
def llm(server):
    return ChatOpenAI(
        base_url=server.base_url + "/v1",
        api_key=API_KEY,
        model="phi-3.5-mini-instruct",
        temperature=0,
        max_tokens=12,
        max_retries=0,
    )


def test_invoke(llm, client_answer):
    message = llm.invoke(QUESTION)
    assert message.content == client_answer.choices[0].message.content
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 12
    assert message.usage_metadata["input_tokens"] == client_answer.usage.prompt_tokens


def test_stream_with_usage(llm, client_answer):
    chunks = list(llm.stream(QUESTION, stream_usage=True))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.content == client_answer.choices[0].message.content
    usage = merged.usage_metadata
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        client_answer.usage.prompt_tokens,
        12,
        client_answer.usage.prompt_tokens + 12,
    )
    assert merged.response_metadata["finish_reason"] == "length"


def test_batch_answers_each_prompt_as_alone(llm):
    prompts = [QUESTION, "Diga olá.", "Conte até três."]
    alone = [llm.invoke(p).content for p in prompts]
    assert [m.content for m in llm.batch(prompts)] == alone


@pytest.fixture(scope="module")
def client_answer(server):
    import openai

    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as client:
        messages = [{"role": "user", "content": QUESTION}]
        return client.chat.completions.create(
            model="phi-3.5-mini-instruct", messages=messages, temperature=0, max_tokens=12
        )
