"""A client of each dialect holds a streamed conversation with a tool call against `make demo`'s model:
the openai SDK on /v1/chat/completions and /v1/responses, the anthropic SDK on /v1/messages, and Ollama's
/api/chat (raw NDJSON for the forced call, which Ollama's client cannot ask for, then the ollama client).

    .venv/bin/python docs/dialect_clients.py     # after `make demo` built demo-model/ once

The demo model is random: the answers are gibberish, the calls well-formed (their grammar forces that).
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anthropic  # noqa: E402
import httpx  # noqa: E402
import ollama  # noqa: E402
import openai  # noqa: E402

from tests.conftest import RunningServer  # noqa: E402
from tests.schemas import WEATHER  # noqa: E402

srv = RunningServer(
    ["--config", "config.yaml", "--model", str(ROOT / "demo-model")], log_path=ROOT / "bench" / "out" / "demo.log"
)
M = "phi-3.5-mini-instruct"
try:
    srv.wait_ready()
    base = srv.base_url
    oa = openai.OpenAI(base_url=base + "/v1", api_key="x")
    # 1. chat completions, streamed, a forced call, then the tool result and a streamed answer
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    msgs = [{"role": "user", "content": "Tempo em Lisboa?"}]
    with oa.chat.completions.stream(
        model=M,
        messages=msgs,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    ) as s:
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    msgs += [
        final.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 °C"},
    ]
    text = "".join(
        c.choices[0].delta.content or ""
        for c in oa.chat.completions.create(model=M, messages=msgs, stream=True, max_tokens=20)
        if c.choices
    )
    print("chat:", call.function.name, call.function.arguments, "->", repr(text[:40]))
    # 2. Responses, streamed
    rtool = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    with oa.responses.stream(
        model=M,
        input="Tempo em Lisboa?",
        tools=rtool,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=100,
        temperature=0,
    ) as s:
        r = s.get_final_response()
    item = r.output[0]
    hist = [
        {"role": "user", "content": "Tempo em Lisboa?"},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": "18 °C"},
    ]
    deltas = [
        e.delta
        for e in oa.responses.create(model=M, input=hist, stream=True, max_output_tokens=20)
        if e.type == "response.output_text.delta"
    ]
    print("responses:", item.name, item.arguments, "->", repr("".join(deltas)[:40]))
    # 3. Anthropic, streamed
    ac = anthropic.Anthropic(base_url=base, api_key="x")
    atool = {"name": "get_weather", "input_schema": WEATHER}
    first = [{"role": "user", "content": "Tempo em Lisboa?"}]
    with ac.messages.stream(
        model=M,
        max_tokens=100,
        messages=first,
        tools=[atool],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as s:
        m = s.get_final_message()
    use = m.content[0]
    hist = [
        *first,
        {"role": "assistant", "content": m.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 °C"}]},
    ]
    with ac.messages.stream(model=M, max_tokens=20, messages=hist, tools=[atool]) as s:
        t = "".join(s.text_stream)
    print("anthropic:", use.name, use.input, m.stop_reason, "->", repr(t[:40]))
    # 4. Ollama, streamed (tool_choice: ptserve's extension, since Ollama cannot force a call)
    body = {
        "model": M,
        "messages": [{"role": "user", "content": "Tempo em Lisboa?"}],
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "options": {"num_predict": 100, "temperature": 0},
    }
    raw = httpx.post(base + "/api/chat", json=body, timeout=60).text.splitlines()
    lines = [json.loads(line) for line in raw if line]
    calls = [c for line in lines for c in (line.get("message", {}).get("tool_calls") or [])]
    oc = ollama.Client(host=base)
    hist = [
        body["messages"][0],
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_name": "get_weather", "content": "18 °C"},
    ]
    t = "".join(p.message.content for p in oc.chat(model=M, messages=hist, stream=True, options={"num_predict": 20}))
    print("ollama:", calls, lines[-1]["done_reason"], "->", repr(t[:40]))
finally:
    srv.stop()
