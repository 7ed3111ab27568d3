"""Grammar benchmark: what constrained decoding costs per token in a 16-request batch.

    python bench/grammar.py [--rows 16] [--steps 64] [--libraries] [--out FILE]

1. Engine: the batching engine on a random-weight Phi-3 (hidden 512, 8 layers) with Phi-3.5's own
   tokenizer (the cost of a grammar mask grows with the vocabulary; Phi-3.5's has 32,011 tokens and
   32,064 embedding rows), 16 requests at once, unconstrained and then each with a JSON-schema grammar
   (llguidance, as the server runs it). Reports the decode step time of both and the difference per step and per token.
2. With --libraries: the mask cost alone for llguidance, xgrammar and outlines-core (whichever are
   installed) on the same vocabulary and schema: 16 matchers, a token drawn among the allowed ones,
   per step. This is the measurement that chose llguidance (ptserve/engine/grammar.py).

The model is built once in bench/out/. A benchmark, not a test: nothing here asserts time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import emit  # noqa: E402

OUT = ROOT / "bench" / "out"
SHAPE = dict(hidden=512, layers=8, heads=8, intermediate=1408)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 8, "maxItems": 32},
        "city": {"enum": ["Lisboa", "Porto", "Rio de Janeiro", "São Paulo"]},
    },
    "required": ["name", "age", "tags", "city"],
}


def build_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from ptserve.tinymodel import TinyShape, build

        build(path, TinyShape(**SHAPE))
    return path


def engine_run(engine, prompt, params_list) -> tuple[float, int, list[float]]:
    """Run the requests together; (seconds, tokens, per-request token counts)."""

    async def one(params):
        n = 0
        async for out in engine.submit(prompt, params):
            n += len(out.token_ids)
        return n

    async def all_():
        return await asyncio.gather(*(one(p) for p in params_list))

    start = time.perf_counter()
    counts = asyncio.run(all_())
    return time.perf_counter() - start, sum(counts), counts


def bench_engine(model_dir: Path, rows: int, steps: int) -> dict:
    from dataclasses import replace

    from ptserve.config import load_config
    from ptserve.engine import loader
    from ptserve.engine.grammar import GrammarBackend
    from ptserve.engine.sampling import SamplingParams
    from ptserve.engine.scheduler import Engine
    from ptserve.protocol import validate_request
    from ptserve.structured import build_grammar

    loaded = loader.load(load_config(None, environ={}, overrides={("model", "id"): str(model_dir)}))
    backend = GrammarBackend(loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)
    engine = Engine(loaded.model, loaded.max_context_length, grammars=backend).start()
    request = validate_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        }
    )
    grammar = build_grammar(request)
    prompt = loaded.tokenizer("Uma pessoa, em JSON:")["input_ids"]
    # Sampled (seeded) rows: greedy decoding of a random model can stay in one string forever.
    free = [SamplingParams(steps, temperature=1.0, seed=i) for i in range(rows)]
    constrained = [replace(p, grammar=grammar, max_tokens=steps) for p in free]
    engine_run(engine, prompt, free[:2])  # warm-up
    results = {}
    try:
        for name, params in (("free", free), ("json_schema", constrained)):
            times = []
            for _ in range(3):
                seconds, tokens, counts = engine_run(engine, prompt, params)
                times.append(seconds / max(counts))  # per step: the batch runs until its longest row ends
            results[name] = {"step_ms": statistics.median(times) * 1000, "tokens": tokens, "rows": rows}
    finally:
        engine.shutdown()
    extra = results["json_schema"]["step_ms"] - results["free"]["step_ms"]
    results["grammar_cost"] = {"per_step_ms": extra, "per_token_ms": extra / rows}
    return results


def bench_libraries(model_dir: Path, rows: int, steps: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    eos = tok.convert_tokens_to_ids("<|end|>")
    schema = json.dumps({**SCHEMA, "additionalProperties": False})
    out = {}
    for name, setup in (("llguidance", _llguidance), ("xgrammar", _xgrammar), ("outlines-core", _outlines)):
        try:
            fill, accept, done = setup(tok, vocab, eos, schema, rows)
        except ImportError:
            out[name] = "not installed"
            continue
        rng = random.Random(0)
        finished = [False] * rows
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            allowed = fill(finished)  # [rows, vocab] bool
            times.append(time.perf_counter() - start)
            for i in range(rows):
                if not finished[i]:
                    ids = allowed[i].nonzero().flatten().tolist()
                    token = rng.choice(ids)
                    start = time.perf_counter()
                    accept(i, token)
                    times[-1] += time.perf_counter() - start
                    finished[i] = done(i)
            if all(finished):
                break
        first, rest = times[0], sorted(times[1:])
        out[name] = {
            "first_step_ms": first * 1000,
            "step_p50_ms": rest[len(rest) // 2] * 1000,
            "step_p90_ms": rest[int(len(rest) * 0.9)] * 1000,
        }
    return out


def _unpack(bitmask, vocab):
    import torch

    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def _llguidance(tok, vocab, eos, schema, rows):
    import llguidance
    import llguidance.hf
    import torch

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(rows)]
    bitmask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(finished):
        for i, m in enumerate(matchers):
            if not finished[i]:
                row = bitmask[i]
                m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        return _unpack(bitmask, vocab)

    return fill, lambda i, t: matchers[i].consume_token(t), lambda i: matchers[i].is_stopped()


def _xgrammar(tok, vocab, eos, schema, rows):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, vocab)

    def fill(finished):
        for i, m in enumerate(matchers):
            if not finished[i]:
                m.fill_next_token_bitmask(bitmask, i)
        return _unpack(bitmask, vocab)

    return fill, lambda i, t: matchers[i].accept_token(t), lambda i: matchers[i].is_terminated()


def _outlines(tok, vocab, eos, schema, rows):
    import outlines_core
    import torch
    from outlines_core.json_schema import build_regex_from_schema

    pieces: dict[bytes, list[int]] = {}
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder) | {eos}
    for piece, i in tok.get_vocab().items():
        if i in special:
            continue
        key = (
            bytes([int(piece[3:5], 16)])
            if piece.startswith("<0x") and len(piece) == 6
            else piece.replace("▁", " ").encode()
        )
        pieces.setdefault(key, []).append(i)
    index = outlines_core.Index(
        build_regex_from_schema(schema, whitespace_pattern=""), outlines_core.Vocabulary(eos, pieces)
    )
    guides = [outlines_core.Guide(index) for _ in range(rows)]

    def fill(finished):
        allowed = torch.zeros(rows, vocab, dtype=torch.bool)
        for i, g in enumerate(guides):
            if finished[i]:
                allowed[i] = True
            else:
                allowed[i, g.get_tokens()] = True
        return allowed

    return fill, lambda i, t: guides[i].advance(t), lambda i: guides[i].is_finished()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--libraries", action="store_true", help="also compare the grammar libraries' mask cost")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model_dir = build_model(OUT / "phi35-tokenizer-hidden512")
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "rows": args.rows,
        "steps": args.steps,
        "engine": bench_engine(model_dir, args.rows, args.steps),
    }
    if args.libraries:
        report["libraries"] = bench_libraries(model_dir, args.rows, args.steps * 3)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
