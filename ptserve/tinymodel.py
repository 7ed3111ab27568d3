"""Build a random-weight Phi-3.5-mini on disk, with no download: the real tokenizer, chat template, special
tokens, EOS list and LongRoPE settings, with a small hidden size.

Tests and `make demo` load it through the real `from_pretrained` path. Everything but the weights comes
from Phi-3.5-mini-instruct's own files, shipped in `ptserve/phi35/` (SOURCES.md there says where each came
from): its SentencePiece vocabulary (32,011 tokens, byte fallback, special tokens that absorb the newline
after them, no BOS), its chat template, its generation config (EOS 32007, 32001, 32000) and its model
config, whose shape is scaled down. LongRoPE keeps Phi-3.5's short and long factors, resampled to the
small head size. Random weights produce gibberish; greedy decoding makes that gibberish deterministic.

    python -m ptserve.tinymodel DIR [--hidden 64 --layers 2 --heads 4 --intermediate 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

PHI35_DIR = Path(__file__).resolve().parent / "phi35"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
PHI35_EOS_IDS = (32007, 32001, 32000)  # <|end|>, <|assistant|>, <|endoftext|>


@dataclass(frozen=True)
class TinyShape:
    """What differs from Phi-3.5-mini (hidden 3072, 32 layers, 32 heads, intermediate 8192, 131072 positions
    scaled by LongRoPE from 4096): `None` keeps Phi-3.5's value."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int = 128
    max_positions: int | None = None  # max_position_embeddings (Phi-3.5: 131072)
    original_max_positions: int | None = None  # where LongRoPE switches to the long factors (Phi-3.5: 4096)
    seed: int = 0


PHI35 = TinyShape(hidden=3072, layers=32, heads=32, intermediate=8192)  # the real model's shape


def phi35_config() -> dict:
    return json.loads((PHI35_DIR / "config.json").read_text())


def resample(factors: list[float], n: int) -> list[float]:
    """Phi-3.5's per-frequency LongRoPE factors (one per pair of head dimensions: 48 for head size 96)
    picked at `n` evenly spaced frequencies, lowest to highest, for a smaller head."""
    if n == len(factors):
        return list(factors)
    if n == 1:
        return [factors[0]]
    return [factors[round(i * (len(factors) - 1) / (n - 1))] for i in range(n)]


def model_config(shape: TinyShape):
    """Phi-3.5-mini's config.json with `shape` applied."""
    from transformers import Phi3Config

    data = phi35_config()
    for key in ("_name_or_path", "auto_map", "transformers_version", "torch_dtype", "architectures"):
        data.pop(key, None)
    data.update(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        intermediate_size=shape.intermediate,
    )
    if shape.max_positions is not None:
        data["max_position_embeddings"] = shape.max_positions
    if shape.original_max_positions is not None:
        data["original_max_position_embeddings"] = shape.original_max_positions
    rope = dict(data.pop("rope_scaling"))
    half = shape.hidden // shape.heads // 2
    rope["short_factor"] = resample(rope["short_factor"], half)
    rope["long_factor"] = resample(rope["long_factor"], half)
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = data.pop("rope_theta")
    rope["original_max_position_embeddings"] = data["original_max_position_embeddings"]
    return Phi3Config(**data, rope_parameters=rope, architectures=["Phi3ForCausalLM"])


def random_model(shape: TinyShape, device: str = "cpu", dtype=None):
    """A random-weight Phi-3.5 of `shape` in `dtype` (bf16 by default), seeded by the shape. On the CPU it
    is initialized in float32 and cast; elsewhere made in `dtype` right on `device`, which is much faster
    for a model of real size."""
    import torch
    from transformers import Phi3ForCausalLM

    dtype = dtype or torch.bfloat16
    config = model_config(shape)
    torch.manual_seed(shape.seed)
    if device == "cpu":
        return Phi3ForCausalLM(config).to(dtype)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return Phi3ForCausalLM(config)
        finally:
            torch.set_default_dtype(default)


def build(path: str | Path, shape: TinyShape = TinyShape(), device: str = "cpu") -> Path:
    """Write a random-weight Phi-3.5 of `shape` and Phi-3.5's tokenizer files to `path`; return the path.
    A model of real size (bench/serve.py --shape phi35) is initialized on `device` ("cuda" there) in bf16,
    which is much faster."""
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(PHI35_DIR / name, path / name)
    model = random_model(shape, device)
    generation = json.loads((PHI35_DIR / "generation_config.json").read_text())
    generation.pop("_from_model_config", None)
    generation.pop("transformers_version", None)
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(path)
    (path / "ptserve-tiny.json").write_text(json.dumps(asdict(shape), indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    defaults = TinyShape()
    for field in ("hidden", "layers", "heads", "intermediate", "max_positions", "original_max_positions", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    args = parser.parse_args(argv)
    shape = TinyShape(**{k: v for k, v in vars(args).items() if k != "path"})
    print(build(args.path, shape))


if __name__ == "__main__":
    main()
