"""Load the model and tokenizer from config with transformers (+ bitsandbytes). Nothing else knows about
quantization."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ptserve.config import Config
from ptserve.engine import cpu_linear, hostmem, paged, rmsnorm, rope

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    eos_token_ids: list[int]
    max_context_length: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are native only with AVX512-BF16 or AMX; elsewhere PyTorch emulates them, and on
    the 2-core AMD EPYC (AVX2) used on 2026-11-26 a batch-16 decode step of the bench model took 108 ms in bf16
    vs 57 ms in float32 (before weight packing; a run not kept in bench/results). On CPUs with AVX512-BF16 or
    AMX (the Intel Xeon used on 2026-11-27) `auto` keeps bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(config: Config, device: torch.device):
    """`auto` keeps the checkpoint's dtype (bf16 for Phi-3.5) except on a CPU without native bf16,
    where float32 is the fast one."""
    if config.model.dtype != "auto":
        return _DTYPES[config.model.dtype]
    if device.type == "cpu" and not cpu_has_fast_bf16():
        return torch.float32
    return "auto"


def _hub_kwargs(config: Config) -> dict:
    # HF_TOKEN (for gated models) is passed through, never logged.
    kwargs = {"revision": config.model.revision, "trust_remote_code": config.model.trust_remote_code}
    token = os.environ.get("HF_TOKEN")
    if token:
        kwargs["token"] = token
    return kwargs


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model.id, **_hub_kwargs(config))


def quantization_config(config: Config):
    from transformers import BitsAndBytesConfig

    q = config.quantization
    if q.mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=_DTYPES[q.bnb_4bit_compute_dtype],
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        )
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every EOS id of the generation config (Phi-3.5: <|endoftext|>, <|assistant|>, <|end|>), plus the
    tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for value in (gen_eos, model.config.eos_token_id, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def context_length(config: Config, model_config) -> int:
    """The configured context window, capped at the model's own (`max_position_embeddings`)."""
    native = int(getattr(model_config, "max_position_embeddings", 0) or 0)
    wanted = config.model.max_context_length
    if wanted is None:
        return native
    if native and wanted > native:
        logger.warning("model.max_context_length %d exceeds the model's %d; using %d", wanted, native, native)
        return native
    return wanted


CPU_KV_CACHE_GB = 4.0  # the KV budget on the CPU when config leaves it to us
GPU_KV_FRACTION = 0.85  # of the memory free after loading the weights (the rest: activations, allocator)


def kv_cache_bytes(config: Config, device: torch.device) -> int:
    if config.server.kv_cache_gb is not None:
        return int(config.server.kv_cache_gb * 1e9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_FRACTION)
    return int(CPU_KV_CACHE_GB * 1e9)


def load_model_config(config: Config):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.model.id, **_hub_kwargs(config))


def load(config: Config, device: str | None = None) -> LoadedModel:
    """`device` is the one LitServe assigned to this worker; an explicit `model.device` wins."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(config.model.device if config.model.device != "auto" or device is None else device)
    quant = quantization_config(config)
    dtype = resolve_dtype(config, device)
    kwargs = dict(_hub_kwargs(config), dtype=dtype, attn_implementation=config.model.attn_implementation)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    logger.info(
        "loading %s (quantization %s) on %s, dtype %s", config.model.id, config.quantization.mode, device, dtype
    )
    model = AutoModelForCausalLM.from_pretrained(config.model.id, **kwargs)
    if quant is None:
        model.to(device)
    model.eval()
    max_context = context_length(config, model.config)
    rope.pin_longrope(model, max_context)
    packable = device.type == "cpu" and quant is None and model.dtype in cpu_linear.PACKED_DTYPES
    packable = packable and cpu_linear.available()
    if packable and not config.server.compile_decode:  # torch.compile cannot lower the packed op
        logger.info("packed %d linear layers for oneDNN", cpu_linear.pack_linears(model))
    if device.type == "cpu" and hostmem.release_weight_files(model):
        logger.info("the tensors left in the mapped weight files copied out of them: the files are unmapped")
    if device.type == "cuda":  # one kernel a norm instead of eight launches (rmsnorm.py), 4 a rotation, not 12
        logger.info("%d RMSNorm layers on torch's fused kernel", rmsnorm.fuse(model))
        rope.fuse_rotary()
        if rope.triton_works(device, dtype, *paged.attention_heads(model.config)):
            logger.info("the rotary embedding in one Triton kernel a layer")
    tokenizer = load_tokenizer(config)
    loaded = LoadedModel(model, tokenizer, device, eos_token_ids(model, tokenizer), max_context)
    logger.info(
        "loaded: %.1f MB, eos ids %s, context %d",
        model.get_memory_footprint() / 1e6,
        loaded.eos_token_ids,
        loaded.max_context_length,
    )
    return loaded
