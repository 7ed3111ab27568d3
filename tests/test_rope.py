"""Tier 2: LongRoPE never couples requests. A tiny Phi-3.5 whose LongRoPE switches at 64 positions (instead
of 4096) is served with a context above and below that; the engine's log-probabilities equal transformers'
eager forward of the request alone, short and long requests, alone and in one batch."""

import asyncio

import pytest
import torch

from ptserve.config import load_config
from ptserve.engine import loader
from ptserve.engine.rope import pin_longrope
from ptserve.engine.sampling import SamplingParams
from ptserve.engine.scheduler import Engine
from ptserve.tinymodel import TinyShape, build

ORIGINAL = 64  # LongRoPE's switch (Phi-3.5: 4096)
SHORT, LONG = 40, 100  # prompt lengths below and above it
SHARPEN = 8.0  # queries, keys and lm_head scaled up: rotations then move log-probabilities by units, not 1e-3
ATOL = 1e-3  # float32 with different matmul shapes (a batch vs one request), any thread count; the wrong
# factors move these log-probabilities by up to ~5


@pytest.fixture(scope="module")
def rope_model_dir(tmp_path_factory):
    """A tiny Phi-3.5 whose random attention is sharp enough for the rotary factors to matter: at
    initialization scale its attention is nearly uniform, whatever the rotation."""
    from safetensors.torch import load_file, save_file

    path = build(tmp_path_factory.mktemp("longrope"), TinyShape(max_positions=256, original_max_positions=ORIGINAL))
    weights = load_file(path / "model.safetensors")
    hidden = TinyShape().hidden
    for name, tensor in weights.items():
        if name.endswith("qkv_proj.weight"):
            tensor[: 2 * hidden] *= SHARPEN  # the query and key rows
        elif name == "lm_head.weight":
            tensor *= SHARPEN
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def load(model_dir, context: int):
    overrides = {
        ("model", "id"): str(model_dir),
        ("model", "dtype"): "float32",
        ("model", "max_context_length"): context,
    }
    return loader.load(load_config(None, environ={}, overrides=overrides))


def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(100, 30000, (n,), generator=gen).tolist() for n in (SHORT, LONG)]


def engine_logprobs(model, context: int, jobs: list[list[int]]) -> list[list[float]]:
    """Each prompt's token log-probabilities (positions 1..), scored by the engine in one batch."""
    engine = Engine(model, context, prefill_chunk=4096).start()

    async def scenario():
        streams = engine.submit_many([(ids, SamplingParams(0, prompt_logprobs=0)) for ids in jobs])
        for stream in streams:
            async for _ in stream:
                pass
        return [[lp.logprob for lp in s.prompt_logprobs[1:]] for s in streams]

    try:
        return asyncio.run(scenario())
    finally:
        engine.shutdown()


def eager_logprobs(model, ids: list[int]) -> list[float]:
    """transformers' eager forward of one request."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def reference(model_dir, choose: str | None):
    """transformers' own model; `choose` pins its LongRoPE as a server with that context would."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if choose is not None:
        pin_longrope(model, {"long": ORIGINAL + 1, "short": ORIGINAL}[choose])
    return model


def test_context_above_the_switch_uses_the_long_factors_for_every_request(rope_model_dir):
    short, long = prompts()
    served = load(rope_model_dir, 256)
    alone = [engine_logprobs(served.model, 256, [ids])[0] for ids in (short, long)]
    together = engine_logprobs(served.model, 256, [short, long])
    # Above the switch transformers itself picks the long factors; below it, pinned long as served.
    assert alone[1] == pytest.approx(eager_logprobs(reference(rope_model_dir, None), long), abs=ATOL)
    assert alone[0] == pytest.approx(eager_logprobs(reference(rope_model_dir, "long"), short), abs=ATOL)
    # A short request beside a long one is rotated as alone (transformers' per-batch switch changed it).
    assert together[0] == pytest.approx(alone[0], abs=ATOL)
    assert together[1] == pytest.approx(alone[1], abs=ATOL)


def test_context_within_the_original_length_uses_the_short_factors(rope_model_dir):
    short, _ = prompts()
    served = load(rope_model_dir, ORIGINAL)
    assert served.max_context_length == ORIGINAL
    [got] = engine_logprobs(served.model, ORIGINAL, [short])
    assert got == pytest.approx(eager_logprobs(reference(rope_model_dir, None), short), abs=ATOL)


def test_greedy_tokens_crossing_the_switch_match_the_long_reference(rope_model_dir):
    """A sequence that crosses 64 positions while decoding keeps one set of factors in its cache: the
    engine's greedy tokens equal a from-scratch long-factor forward at every step."""
    short, _ = prompts()
    served = load(rope_model_dir, 256)
    engine = Engine(served.model, 256).start()

    async def scenario():
        tokens = []
        async for out in engine.submit(short, SamplingParams(40, temperature=0.0)):
            tokens += out.token_ids
        return tokens

    try:
        tokens = asyncio.run(scenario())
    finally:
        engine.shutdown()
    ref = reference(rope_model_dir, "long")
    ids = list(short)
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    assert tokens == ids[len(short) :]
