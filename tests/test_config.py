"""Tier 1: configuration precedence and bad-config messages (no model)."""

import subprocess
import sys

import pytest

from ptserve.config import DEFAULT_SYSTEM_PROMPT, ConfigError, load_config
from tests.conftest import ROOT


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_tutorials():
    config = load_config(None, environ={})
    assert config.model.id == "microsoft/Phi-3.5-mini-instruct"
    assert config.model.served_name == "phi-3.5-mini-instruct"
    assert config.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert (config.generation.max_tokens, config.generation.temperature, config.generation.top_p) == (500, 0.1, 1.0)
    assert (config.server.host, config.server.port, config.server.api_key) == ("127.0.0.1", 8000, None)
    assert config.quantization.mode == "none"


def test_shipped_config_yaml_documents_every_key():
    import yaml

    from ptserve.config import SECTIONS, TOP_LEVEL_SCALARS

    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert set(shipped) == set(SECTIONS) | set(TOP_LEVEL_SCALARS)
    for section, model in SECTIONS.items():
        assert set(shipped[section]) == set(model.model_fields), section


def test_shipped_config_yaml_loads_and_equals_the_defaults():
    assert load_config(ROOT / "config.yaml", environ={}).model_dump() == load_config(None, environ={}).model_dump()


def test_yaml_then_env_then_cli(tmp_path):
    path = write(tmp_path, "server:\n  port: 9001\n  host: 0.0.0.0\ngeneration:\n  temperature: 0.5\n")
    env = {"PTSERVE_SERVER_PORT": "9002", "PTSERVE_GENERATION_MAX_TOKENS": "64"}
    config = load_config(path, environ=env, overrides={("server", "port"): 9003, ("model", "id"): None})
    assert config.server.port == 9003  # CLI beats env beats YAML
    assert config.server.host == "0.0.0.0"  # YAML only
    assert config.generation.max_tokens == 64  # env only
    assert config.generation.temperature == 0.5
    assert config.model.id == "microsoft/Phi-3.5-mini-instruct"  # a flag left out overrides nothing


def test_env_types_lists_and_aliases():
    env = {
        "PTSERVE_MODEL_TRUST_REMOTE_CODE": "true",
        "PTSERVE_SERVER_CORS_ORIGINS": "http://a.test, http://b.test",
        "PTSERVE_API_KEY": "secret, second",
        "PTSERVE_SYSTEM_PROMPT": "",
        "PTSERVE_MODEL_MAX_CONTEXT_LENGTH": "",
    }
    config = load_config(None, environ=env)
    assert config.model.trust_remote_code is True
    assert config.server.cors_origins == ["http://a.test", "http://b.test"]
    assert config.server.api_keys == ["secret", "second"]  # several keys, comma-separated
    assert config.system_prompt == ""  # an empty prompt turns the default off
    assert config.model.max_context_length is None


def test_unknown_yaml_key_names_key_and_allowed(tmp_path):
    path = write(tmp_path, "model:\n  idd: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert f"unknown config key 'model.idd' (from {path})" in str(err.value)
    assert "attn_implementation, device, dtype, id," in str(err.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'serve'"):
        load_config(write(tmp_path, "serve:\n  port: 1\n"), environ={})


def test_wrong_type_names_key_value_and_source():
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"PTSERVE_SERVER_PORT": "eighty"})
    assert "'server.port' (from env PTSERVE_SERVER_PORT): 'eighty' - Input should be a valid integer" in str(err.value)


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("quantization:\n  mode: 3bit\n", "'quantization.mode' (from"),
        ("generation:\n  temperature: 2.5\n", "2.5 - Input should be less than or equal to 2"),
        ("generation:\n  top_p: 0\n", "0 - Input should be greater than 0"),
        ("server:\n  port: 80\n", "80 - Input should be greater than or equal to 1024"),
        ("server:\n  prefill_chunk_tokens: 8\n", "8 - Input should be greater than or equal to 16"),
        ("server:\n  host: example.com\n", "must be one of 127.0.0.1, 0.0.0.0, ::"),
        ("model:\n  device: gpu\n", "must be auto, cpu, cuda or cuda:N"),
        ("model:\n  dtype: int4\n", "Input should be 'auto', 'bfloat16', 'float16' or 'float32'"),
    ],
)
def test_bad_values(tmp_path, yaml_text, expected):
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        load_config(write(tmp_path, yaml_text), environ={})
    assert expected in str(err.value)


def test_kubernetes_service_variables_are_ignored():
    """What the kubelet injects for a Service named `ptserve` (and `ptserve-metrics`): start-up goes on."""
    kubelet = {
        "PTSERVE_PORT": "tcp://10.0.0.7:80",
        "PTSERVE_SERVICE_HOST": "10.0.0.7",
        "PTSERVE_SERVICE_PORT": "80",
        "PTSERVE_SERVICE_PORT_HTTP": "80",
        "PTSERVE_PORT_80_TCP": "tcp://10.0.0.7:80",
        "PTSERVE_PORT_80_TCP_PROTO": "tcp",
        "PTSERVE_PORT_80_TCP_PORT": "80",
        "PTSERVE_PORT_80_TCP_ADDR": "10.0.0.7",
        "PTSERVE_METRICS_SERVICE_HOST": "fd00::7",
        "PTSERVE_METRICS_PORT": "tcp://[fd00::7]:9090",
    }
    config = load_config(None, environ={**kubelet, "PTSERVE_SERVER_PORT": "9001"})
    assert config.server.port == 9001
    assert config.model_dump() == load_config(None, environ={"PTSERVE_SERVER_PORT": "9001"}).model_dump()


@pytest.mark.parametrize(
    ("var", "value"),
    [("PTSERVE_PORT", "9000"), ("PTSERVE_SERVICE_HOST", "my-host"), ("PTSERVE_SERVER_PROT", "9000")],
)
def test_mistyped_keys_still_fail_beside_kubernetes_shapes(var, value):
    with pytest.raises(ConfigError, match=f"unknown environment variable {var}='{value}' \\(did you mean"):
        load_config(None, environ={var: value})


def test_unknown_env_var_is_an_error():
    with pytest.raises(ConfigError, match="unknown environment variable PTSERVE_MODEL_NAME='x'"):
        load_config(None, environ={"PTSERVE_MODEL_NAME": "x"})


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_secrets_are_redacted():
    config = load_config(None, environ={"PTSERVE_SERVER_API_KEY": "hunter2"})
    assert config.non_defaults() == {"server": {"api_key": ["***"]}}
    assert "hunter2" not in repr(config.redacted())
    config = load_config(None, environ={}, overrides={("server", "api_key"): "one"})
    assert (config.server.api_keys, config.non_defaults()) == (["one"], {"server": {"api_key": "***"}})
    assert load_config(None, environ={}).server.api_keys == []


def test_bad_config_stops_startup_with_one_message(tmp_path):
    path = write(tmp_path, "server:\n  port: nope\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "bad value for config key 'server.port'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unloadable_model_stops_startup_with_a_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--model", str(tmp_path / "no" / "such" / "model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "ptserve: cannot load model" in proc.stderr
