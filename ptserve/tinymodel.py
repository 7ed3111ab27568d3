"""Build a random-weight Phi-3 with a Phi-3.5-style tokenizer, on disk, with no download.

Tests and `make demo` load it through the real `from_pretrained` path. The tokenizer mirrors
Phi-3.5-mini-instruct's: SentencePiece-style BPE with byte fallback ("▁" for spaces), the special
tokens `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`, `<|endoftext|>`, Phi-3.5's chat template,
and a generation config whose EOS ids are `<|endoftext|>`, `<|assistant|>` and `<|end|>`, as the real one.
Random weights produce gibberish; greedy decoding makes that gibberish deterministic.

    python -m ptserve.tinymodel DIR [--hidden 64 --layers 2 --heads 4 --intermediate 128]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# Phi-3.5-mini-instruct's chat template, verbatim.
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
EOS_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>"]  # Phi-3.5's generation_config: 32000, 32001, 32007

# A little text in the two languages the tutorial used, so the BPE learns real words.
_CORPUS = """\
Você é um assistente virtual prestativo. Responda somente em Português.
Olá! Como posso ajudar você hoje? O tempo está bom, e o céu está azul.
A capital do Brasil é Brasília. O Rio de Janeiro tem praias famosas.
Hello, how are you today? The quick brown fox jumps over the lazy dog.
Large language models generate text one token at a time, streaming words to the user.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Symbols: {"key": [1, 2, 3]} (a, b) -> c; x = y + z!
"""


@dataclass(frozen=True)
class TinyShape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int = 128
    max_positions: int = 2048
    vocab_target: int = 512  # learned merges stop here; specials and bytes come on top
    seed: int = 0
    vocab_size: int | None = None  # the model's vocabulary when larger than the tokenizer's (Phi-3.5: 32064)


def _normalizer():
    from tokenizers import normalizers

    # Phi-3.5 (Llama-style SentencePiece): prepend "▁", spaces become "▁", no pre-tokenizer.
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def build_tokenizer(path: Path, shape: TinyShape, corpus: list[str] | None = None):
    """`corpus`: text to learn merges from (default: a few built-in lines); a large vocab_target needs
    a large corpus."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_target - 256,
        special_tokens=SPECIAL_TOKENS[:3],
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789▁.,!?"),
        # With a real corpus, pieces stay short as in real vocabularies (long runs like "####" stay split).
        max_token_length=16 if corpus is not None else None,
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = _normalizer()
    trained.train_from_iterator(corpus if corpus is not None else _CORPUS.splitlines() * 4, trainer=trainer)
    learned = json.loads(trained.to_str())["model"]
    # As in Llama/Phi-3.5: <unk> <s> </s>, then the 256 byte-fallback tokens <0x00>..<0xFF> (ordinary,
    # not special: skipping special tokens on decode must keep them), then the learned pieces.
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS[:3] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = _normalizer()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        chat_template=PHI35_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=shape.max_positions,
    )
    fast.save_pretrained(path)
    return fast


def build(
    path: str | Path, shape: TinyShape = TinyShape(), corpus: list[str] | None = None, device: str = "cpu"
) -> Path:
    """Write a random-weight Phi-3 and its tokenizer to `path`; return the path. A model of real size
    (bench/serve.py --shape phi35) is initialized on `device` ("cuda" there) in bf16, which is much faster."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, shape, corpus)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS]
    config = Phi3Config(
        vocab_size=shape.vocab_size or len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        max_position_embeddings=shape.max_positions,
        original_max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(shape.seed)
    if device == "cpu":
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    else:
        with torch.device(device):
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = Phi3ForCausalLM(config)
            finally:
                torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path)
    (path / "ptserve-tiny.json").write_text(json.dumps(shape.__dict__, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    defaults = TinyShape()
    for field in ("hidden", "layers", "heads", "intermediate", "max_positions", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    args = parser.parse_args(argv)
    shape = TinyShape(**{k: v for k, v in vars(args).items() if k != "path"})
    print(build(args.path, shape))


if __name__ == "__main__":
    main()
