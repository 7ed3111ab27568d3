"""Typed configuration: `config.yaml` < `PTSERVE_<SECTION>_<KEY>` env vars < command-line flags.

Every key is declared here once, with its default and its allowed values. Unknown keys, wrong types
and bad values stop start-up with one message naming the key (and where it came from), the value and
what is allowed.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger(__name__)

ENV_PREFIX = "PTSERVE_"
DEFAULT_SYSTEM_PROMPT = "Você é um assistente virtual prestativo. Responda somente em Português."
ALLOWED_HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # LitServe binds only these
SECRET_KEYS = {("server", "api_key")}
# Short env names people expect, on top of the PTSERVE_<SECTION>_<KEY> form.
ENV_ALIASES = {"PTSERVE_API_KEY": ("server", "api_key")}
# Kubernetes gives every pod "service links" for each Service in its namespace: a Service named `ptserve`
# (or `ptserve-anything`) becomes PTSERVE_SERVICE_HOST, PTSERVE_PORT=tcp://10.0.0.7:80, PTSERVE_PORT_80_TCP_ADDR
# and so on. They are not ours: a variable of that name *and* value shape is skipped, anything else unknown
# still stops start-up.
_SERVICE = r"^PTSERVE(?:_[A-Z0-9_]+)?"  # the Service's name, upper-cased, "-" as "_"
_SERVICE_URL = re.compile(r"^(?:tcp|udp|sctp)://\[?(?P<addr>[0-9A-Fa-f:.]+)\]?:\d{1,5}$")


class ConfigError(ValueError):
    """Bad configuration: the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    id: str = Field("microsoft/Phi-3.5-mini-instruct", min_length=1)
    served_name: str = Field("phi-3.5-mini-instruct", min_length=1)
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    max_context_length: int | None = Field(None, ge=16)
    aliases: list[str] = []  # more names /v1/models lists and requests may use
    strict_names: bool = False  # true: a request naming another model gets 404 model_not_found

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class QuantizationSettings(_Section):
    mode: Literal["none", "4bit", "8bit"] = "none"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    bnb_4bit_use_double_quant: bool = True


class GenerationSettings(_Section):
    max_tokens: int = Field(500, ge=1)
    temperature: float = Field(0.1, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class ServerSettings(_Section):
    @property
    def api_keys(self) -> list[str]:
        if self.api_key is None:
            return []
        keys = [self.api_key] if isinstance(self.api_key, str) else self.api_key
        return [k for k in keys if k]

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1024, le=65535)
    api_key: str | list[str] | None = None
    cors_origins: list[str] = []
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1)
    request_timeout_s: float | None = Field(600.0, gt=0)
    devices: int | Literal["auto"] = 1  # GPUs to use, one engine replica per device; "auto" = all
    workers_per_device: int = Field(1, ge=1)  # engine replicas per device (each loads the model)
    shutdown_timeout_s: float = Field(30.0, ge=0)  # on SIGTERM: in-flight requests may finish this long
    max_concurrent_sequences: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=1)
    kv_cache_gb: float | None = Field(None, gt=0)
    prefix_caching: bool = True  # reuse the KV of prompt prefixes seen before (system prompt, earlier turns)
    compile_decode: bool = False  # decoding passes through torch.compile at bucketed shapes (CUDA graphs on CUDA)
    cuda_graphs: bool = True  # on a GPU, decoding passes replayed from CUDA graphs (eager ones on the CPU)
    async_scheduling: bool = True  # on a GPU with cuda_graphs, a decoding pass launched before the last one is read
    prefill_chunk_tokens: int | None = Field(None, ge=16)  # prompt tokens a pass; None: the engine picks by device

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v == "localhost":
            return "127.0.0.1"
        if v not in ALLOWED_HOSTS:
            raise ValueError(f"must be one of {', '.join(ALLOWED_HOSTS)}")
        return v


class Config(_Section):
    model: ModelSettings = ModelSettings()
    quantization: QuantizationSettings = QuantizationSettings()
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    generation: GenerationSettings = GenerationSettings()
    server: ServerSettings = ServerSettings()

    def redacted(self) -> dict[str, Any]:
        data = self.model_dump()
        for section, key in SECRET_KEYS:
            if isinstance(data[section][key], list):
                data[section][key] = ["***"] * len(data[section][key])
            elif data[section][key] is not None:
                data[section][key] = "***"
        return data

    def non_defaults(self) -> dict[str, Any]:
        """The settings that differ from the defaults, secrets redacted: what start-up logs."""
        ours, base = self.redacted(), Config().model_dump()
        out: dict[str, Any] = {}
        for name, value in ours.items():
            if isinstance(value, dict):
                diff = {k: v for k, v in value.items() if v != base[name][k]}
                if diff:
                    out[name] = diff
            elif value != base[name]:
                out[name] = value
        return out


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation
    for name, field in Config.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
}
TOP_LEVEL_SCALARS = [name for name in Config.model_fields if name not in SECTIONS]


def _allowed(keys) -> str:
    return ", ".join(sorted(keys))


def _env_overrides(environ: dict[str, str]) -> list[tuple[tuple[str, ...], Any, str]]:
    out = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        if var in ENV_ALIASES:
            section, key = ENV_ALIASES[var]
            out.append((ENV_ALIASES[var], _env_value(SECTIONS[section], key, raw), f"env {var}"))
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if rest in TOP_LEVEL_SCALARS:
            out.append(((rest,), raw, f"env {var}"))
            continue
        section, _, key = rest.partition("_")
        if section not in SECTIONS or key not in SECTIONS[section].model_fields:
            if kubernetes_service_link(var, raw):
                logger.debug("ignoring Kubernetes service variable %s", var)
                continue
            known = [f"{ENV_PREFIX}{s.upper()}" for s in TOP_LEVEL_SCALARS] + [
                f"{ENV_PREFIX}{s.upper()}_{k.upper()}" for s, m in SECTIONS.items() for k in m.model_fields
            ]
            close = difflib.get_close_matches(var, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown environment variable {var}={raw!r}{hint}; allowed: {_allowed(known)}")
        out.append(((section, key), _env_value(SECTIONS[section], key, raw), f"env {var}"))
    return out


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_service_url(text: str) -> bool:
    url = _SERVICE_URL.match(text)
    return url is not None and _is_address(url["addr"])


# (name shape, value check) of each variable the kubelet injects for a Service.
_SERVICE_LINKS = [
    (re.compile(_SERVICE + r"_SERVICE_HOST$"), _is_address),
    (re.compile(_SERVICE + r"_SERVICE_PORT(?:_[A-Z0-9_]+)?$"), str.isdigit),
    (re.compile(_SERVICE + r"_PORT(?:_\d+_(?:TCP|UDP|SCTP))?$"), _is_service_url),
    (re.compile(_SERVICE + r"_PORT_\d+_(?:TCP|UDP|SCTP)_PROTO$"), lambda v: v in ("tcp", "udp", "sctp")),
    (re.compile(_SERVICE + r"_PORT_\d+_(?:TCP|UDP|SCTP)_PORT$"), str.isdigit),
    (re.compile(_SERVICE + r"_PORT_\d+_(?:TCP|UDP|SCTP)_ADDR$"), _is_address),
]


def kubernetes_service_link(var: str, raw: str) -> bool:
    """Whether `var`=`raw` is a variable the kubelet injects for a Service whose name starts with ptserve."""
    return any(name.match(var) and valid(raw) for name, valid in _SERVICE_LINKS)


def _env_value(section: type[_Section], key: str, raw: str) -> Any:
    annotation = str(section.model_fields[key].annotation)
    if "list" in annotation:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if raw == "" and "None" in annotation:
        return None
    return raw  # pydantic coerces "8000" -> 8000, "true" -> True


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[tuple[str, ...], Any] | None = None,
) -> Config:
    """YAML file < environment < `overrides` (the CLI's flags, keyed by (section, key))."""
    environ = dict(os.environ if environ is None else environ)
    tree: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
        for section, value in tree.items():
            if isinstance(value, dict):
                for key in value:
                    sources[(section, key)] = f"{path}"
            sources[(section,)] = f"{path}"
    for key_path, value, source in _env_overrides(environ):
        _set(tree, key_path, value)
        sources[key_path] = source
    for key_path, value in (overrides or {}).items():
        if value is not None:
            _set(tree, key_path, value)
            sources[key_path] = "command line"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _explain(exc: ValidationError, sources: dict[tuple[str, ...], str]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        source = sources.get(loc[:2]) or sources.get(loc[:1]) or "defaults"
        if err["type"] == "extra_forbidden":
            model = SECTIONS.get(loc[0]) if len(loc) > 1 else Config
            allowed = _allowed(model.model_fields) if model else ""
            lines.append(f"unknown config key '{key}' (from {source}); allowed here: {allowed}")
        else:
            shown = "***" if loc[:2] in SECRET_KEYS else repr(err["input"])
            lines.append(f"bad value for config key '{key}' (from {source}): {shown} - {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
