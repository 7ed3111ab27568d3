"""Tier 3: the server started with --quantization 4bit / PTSERVE_QUANTIZATION_MODE=8bit on the CPU."""

import httpx
import pytest

from tests.conftest import RunningServer
from tests.openai_schema import validate

pytestmark = pytest.mark.server


@pytest.mark.parametrize("how", ["flag-4bit", "env-8bit"])
def test_quantized_server_answers(tiny_model_dir, tmp_path, how):
    if how == "flag-4bit":
        srv = RunningServer(["--model", str(tiny_model_dir), "--quantization", "4bit"], log_path=tmp_path / "log")
    else:
        env = {"PTSERVE_QUANTIZATION_MODE": "8bit", "PTSERVE_MODEL_ID": str(tiny_model_dir)}
        srv = RunningServer([], env=env, log_path=tmp_path / "log")
    try:
        srv.wait_ready()
        body = {"model": "m", "messages": [{"role": "user", "content": "Olá"}], "max_tokens": 5, "temperature": 0}
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        validate(r.json(), "CreateChatCompletionResponse")
        assert r.json()["usage"]["completion_tokens"] == 5
        mode = "4bit" if how == "flag-4bit" else "8bit"
        log = srv.log_path.read_text()
        assert f"loading {tiny_model_dir} (quantization {mode}) on cpu" in log
        assert "MatMul8bitLt" not in log
    finally:
        srv.stop()
