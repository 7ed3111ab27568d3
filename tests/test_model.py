"""Tier 2: the tiny local Phi-3 through the real from_pretrained path: template, detokenizer, engine,
quantization."""

import asyncio
import dataclasses

import pytest
import torch

from ptserve.config import load_config
from ptserve.engine import loader
from ptserve.engine.detokenize import IncrementalDetokenizer, TextStream, TokenNames
from ptserve.engine.sampling import SamplingParams
from ptserve.engine.scheduler import Engine, EngineFull, NeverFits
from ptserve.prompting import encode_prompt, render_messages
from ptserve.protocol import ChatMessage

PROMPT = [ChatMessage(role="user", content="Olá, tudo bem? 😀")]
# Engine vs transformers' forward, float32: the matmuls differ in shape (chunks, batches), so the sums
# differ in order, by ~1e-6 here and more on other CPUs and thread counts. A wrong token or position moves a
# log-probability of this random model by 0.1-1.5.
LOGPROB_ATOL = 1e-3


def config_for(model_dir, **quantization):
    """float32 whatever the CPU: numerics are compared with transformers' own forward, and bf16 rounding
    differs with the kernel the CPU picks (AVX512-BF16/AMX machines run "auto" in bf16)."""
    overrides = {("model", "id"): str(model_dir), ("model", "dtype"): "float32"}
    overrides.update({("quantization", k): v for k, v in quantization.items()})
    return load_config(None, environ={}, overrides=overrides)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return loader.load(config_for(tiny_model_dir))


def prompt_ids(tokenizer, system="Você é útil."):
    return encode_prompt(tokenizer, render_messages(PROMPT, system))


def run_engine(engine, jobs):
    """Submit (prompt_ids, params) jobs together; return [(token_ids, finish_reason)] in order."""

    async def one(ids, params):
        tokens, finish = [], None
        async for out in engine.submit(ids, params):
            tokens += out.token_ids
            finish = out.finish_reason
        return tokens, finish

    async def all_jobs():
        return await asyncio.gather(*(one(ids, params) for ids, params in jobs))

    return asyncio.run(all_jobs())


async def drain(stream) -> list[int]:
    """Every token id a GenerationStream yields."""
    tokens = []
    async for out in stream:
        tokens += out.token_ids
    return tokens


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, min_new_tokens=n)
    return out[0, len(ids) :].tolist()


# -- prompt -------------------------------------------------------------------------------------------
def test_phi35_template_text(tokenizer):
    text = tokenizer.apply_chat_template(render_messages(PROMPT, "SYS"), add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nSYS<|end|>\n<|user|>\nOlá, tudo bem? 😀<|end|>\n<|assistant|>\n"


def test_prompt_ids_keep_special_tokens_whole(tokenizer):
    ids = prompt_ids(tokenizer, "")
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|end|>", "<|assistant|>")]
    assert ids[0] == specials[0] and specials[1] in ids and specials[2] in ids
    assert tokenizer.bos_token_id not in ids  # Phi-3.5's template adds no BOS
    assert [i for i in ids if i in specials] == specials  # <|user|> ... <|end|> ... <|assistant|>
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "Olá, tudo bem? 😀"


# Phi-3.5-mini-instruct's ids for the tutorial's system prompt and "Olá! Quem é você?" with the generation
# prompt (ptserve/phi35/SOURCES.md): the newline after each special token is absorbed, no BOS.
PHI35_PROMPT_IDS = [
    32006, 478, 542, 30037, 904, 1922, 6985, 2016, 6901, 18619, 11692, 29889, 2538, 2818, 29874, 1047,
    2016, 953, 8451, 29884, 8769, 29889, 32007, 32010, 7137, 29976, 29991, 751, 331, 904, 7931, 30037,
    29973, 32007, 32001,
]  # fmt: skip


def test_prompt_ids_are_phi35s(tokenizer):
    from ptserve.config import DEFAULT_SYSTEM_PROMPT

    messages = render_messages([ChatMessage(role="user", content="Olá! Quem é você?")], DEFAULT_SYSTEM_PROMPT)
    assert encode_prompt(tokenizer, messages) == PHI35_PROMPT_IDS
    assert len(tokenizer) == 32011


def test_eos_ids_come_from_the_generation_config(loaded, tokenizer):
    assert loaded.eos_token_ids == [32007, 32001, 32000]  # <|end|>, <|assistant|>, <|endoftext|>
    assert tokenizer.convert_ids_to_tokens(loaded.eos_token_ids) == ["<|end|>", "<|assistant|>", "<|endoftext|>"]
    assert loaded.max_context_length == 131072  # Phi-3.5's own, LongRoPE-scaled


# -- detokenizer --------------------------------------------------------------------------------------
def test_incremental_text_equals_full_decode(tokenizer):
    text = 'Olá, mundo! 😀 Ação — 42 {"a": [1, 2]}  dois  espaços ✓'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # multi-byte characters are never split


@pytest.mark.parametrize(
    ("text", "stop", "shown"),
    [("abc STOP def", "STOP", "abc "), ("Olá mundo, FIMDEJOGO e depois", "DEJO", "Olá mundo, FIM")],
    ids=["whole-word", "across-phi35-pieces"],
)
def test_text_stream_stop_string(tokenizer, text, stop, shown):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [stop])
    out = ""
    for i in ids:
        out += stream.add(i)
        if stream.stopped:
            break
    assert (out, stream.stopped) == (shown, True)


# -- engine -------------------------------------------------------------------------------------------
def test_engine_greedy_equals_transformers_generate(loaded, tokenizer):
    ids = prompt_ids(tokenizer)
    engine = Engine(loaded.model, loaded.max_context_length).start()
    try:
        [(tokens, finish)] = run_engine(engine, [(ids, SamplingParams(12, temperature=0.0))])
    finally:
        engine.shutdown()
    assert tokens == hf_greedy(loaded.model, ids, 12)
    assert finish == "length"


def test_engine_stops_at_an_eos_id(loaded, tokenizer):
    ids = prompt_ids(tokenizer)
    reference = hf_greedy(loaded.model, ids, 12)
    eos = reference[4]
    expected = reference[: reference.index(eos) + 1]
    engine = Engine(loaded.model, loaded.max_context_length).start()
    try:
        params = SamplingParams(12, temperature=0.0, stop_token_ids=(eos,))
        [(tokens, finish)] = run_engine(engine, [(ids, params)])
    finally:
        engine.shutdown()
    assert (tokens, finish) == (expected, "stop")


def test_concurrent_requests_do_not_mix_and_seeds_repeat(loaded, tokenizer):
    a, b = prompt_ids(tokenizer), prompt_ids(tokenizer, "Outro sistema.")
    greedy = SamplingParams(8, temperature=0.0)
    seeded = SamplingParams(8, temperature=1.0, seed=123)
    engine = Engine(loaded.model, loaded.max_context_length).start()
    try:
        alone = run_engine(engine, [(a, greedy), (b, seeded)])
        together = run_engine(engine, [(b, seeded), (a, greedy), (a, greedy), (b, seeded)])
    finally:
        engine.shutdown()
    assert together == [alone[1], alone[0], alone[0], alone[1]]


def test_engine_respects_context_window(loaded, tokenizer):
    ids = prompt_ids(tokenizer)
    engine = Engine(loaded.model, max_context_length=len(ids) + 3).start()
    try:
        [(tokens, finish)] = run_engine(engine, [(ids, SamplingParams(50, temperature=0.0))])
    finally:
        engine.shutdown()
    assert (len(tokens), finish) == (3, "length")


def test_cancel_and_queue_limit(loaded, tokenizer):
    ids = prompt_ids(tokenizer)

    async def scenario(engine):
        long = engine.submit(ids, SamplingParams(1000, temperature=0.0))
        seen, waiting = 0, None
        async for out in long:
            seen += len(out.token_ids)
            if waiting is None:  # `long` runs now: one may wait, a second may not
                waiting = engine.submit(ids, SamplingParams(3, temperature=0.0))
                with pytest.raises(EngineFull):
                    engine.submit(ids, SamplingParams(3, temperature=0.0))
            if seen >= 2 and out.finish_reason is None:
                long.cancel()
            if out.finish_reason:
                first_finish = out.finish_reason
        tokens = []
        async for out in waiting:
            tokens += out.token_ids
            finish = out.finish_reason
        return first_finish, seen, tokens, finish

    engine = Engine(loaded.model, loaded.max_context_length, max_queued=1, max_seqs=1).start()
    try:
        finish_long, seen, tokens, finish = asyncio.run(scenario(engine))
    finally:
        engine.shutdown()
    assert finish_long == "abort" and seen < 1000
    assert (len(tokens), finish) == (3, "length")  # the next request ran once the first was cancelled


# -- quantization -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, layer_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")], ids=["4bit-nf4", "8bit"]
)
def test_bitsandbytes_quantizes_on_cpu_and_answers(tiny_model_dir, tokenizer, loaded, mode, layer_class):
    quantized = loader.load(config_for(tiny_model_dir, mode=mode))
    proj = quantized.model.model.layers[0].mlp.gate_up_proj
    assert type(proj).__name__ == layer_class
    assert quantized.model.get_memory_footprint() < loaded.model.get_memory_footprint()
    ids = prompt_ids(tokenizer)
    engine = Engine(quantized.model, quantized.max_context_length).start()
    try:
        [(tokens, finish)] = run_engine(engine, [(ids, SamplingParams(6, temperature=0.0))])
    finally:
        engine.shutdown()
    assert (len(tokens), finish) == (6, "length")
    assert all(0 <= t < len(tokenizer) for t in tokens)


def test_sampling_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams(1).max_tokens = 2


# -- continuous batching ------------------------------------------------------------------------------
def sixteen_jobs(tokenizer):
    """16 prompts of different lengths, each with its own max_tokens."""
    jobs = []
    for i in range(16):
        text = "Olá " * (1 + 3 * i) + f"pergunta {i}?"
        ids = encode_prompt(tokenizer, render_messages([ChatMessage(role="user", content=text)], ""))
        jobs.append((ids, SamplingParams(6 + 2 * (i % 5), temperature=0.0)))
    return jobs


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_tokens_identical_alone_and_among_16(tiny_model_dir, tokenizer, dtype):
    # Holds in bf16 too on this CPU: a row's matmul reduces the same way alone or in a batch here.
    overrides = {("model", "id"): str(tiny_model_dir), ("model", "dtype"): dtype}
    loaded = loader.load(load_config(None, environ={}, overrides=overrides))
    assert str(loaded.model.dtype) == f"torch.{dtype}"
    jobs = sixteen_jobs(tokenizer)
    assert len({len(ids) for ids, _ in jobs}) == 16
    engine = Engine(loaded.model, loaded.max_context_length, max_seqs=16).start()
    try:
        alone = [run_engine(engine, [job])[0] for job in jobs]
        together = run_engine(engine, jobs)
        reversed_order = run_engine(engine, jobs[::-1])[::-1]
    finally:
        engine.shutdown()
    assert together == alone
    assert reversed_order == alone
    assert [len(t) for t, _ in alone] == [p.max_tokens for _, p in jobs]


def test_requests_join_and_leave_a_running_batch(loaded, tokenizer):
    """Late arrivals join at the next step; early finishers leave; nobody's tokens change."""
    jobs = sixteen_jobs(tokenizer)
    engine = Engine(loaded.model, loaded.max_context_length, max_seqs=4, prefill_chunk=64).start()

    async def staggered():
        async def one(k, ids, params):
            await asyncio.sleep(0.002 * k)
            tokens = []
            async for out in engine.submit(ids, params):
                tokens += out.token_ids
            return tokens

        return await asyncio.gather(*(one(k, ids, p) for k, (ids, p) in enumerate(jobs)))

    try:
        alone = [run_engine(engine, [job])[0][0] for job in jobs]
        mixed = asyncio.run(staggered())
    finally:
        engine.shutdown()
    assert mixed == alone


def test_long_prompt_is_prefilled_in_chunks(loaded, tokenizer):
    ids = encode_prompt(tokenizer, render_messages([ChatMessage(role="user", content="Olá mundo " * 80)], ""))
    params = SamplingParams(5, temperature=0.0)
    assert len(ids) > 3 * 64
    whole = Engine(loaded.model, loaded.max_context_length).start()
    chunked = Engine(loaded.model, loaded.max_context_length, prefill_chunk=64).start()
    try:
        [(in_chunks, _)] = run_engine(chunked, [(ids, params)])
        [(at_once, _)] = run_engine(whole, [(ids, params)])
    finally:
        whole.shutdown()
        chunked.shutdown()
    assert in_chunks == at_once == hf_greedy(loaded.model, ids, 5)


def test_per_request_sampling_in_one_batch(loaded, tokenizer):
    ids = prompt_ids(tokenizer)
    engine = Engine(loaded.model, loaded.max_context_length).start()
    jobs = [
        (ids, SamplingParams(8, temperature=0.0)),
        (ids, SamplingParams(8, temperature=1.5, top_k=1)),  # top_k=1 is greedy whatever the temperature
        (ids, SamplingParams(8, temperature=1.0, seed=5)),
        (ids, SamplingParams(8, temperature=1.0, top_p=0.5, seed=5)),
        (ids, SamplingParams(3, temperature=1.0, seed=9)),
    ]
    try:
        together = run_engine(engine, jobs)
        alone = [run_engine(engine, [job])[0] for job in jobs]
    finally:
        engine.shutdown()
    assert together == alone
    assert together[0] == together[1]
    assert len(together[4][0]) == 3


# -- every sampling parameter, on the real model ------------------------------------------------------
def run_full(engine, jobs):
    """Like run_engine, but returns the StepOutputs' logprobs and the streams too."""

    async def one(ids, params):
        stream = engine.submit(ids, params)
        tokens, logprobs, finish = [], [], None
        async for out in stream:
            tokens += out.token_ids
            logprobs += out.logprobs or []
            finish = out.finish_reason
        return tokens, logprobs, finish, stream

    async def all_jobs():
        return await asyncio.gather(*(one(ids, params) for ids, params in jobs))

    return asyncio.run(all_jobs())


@pytest.fixture(scope="module")
def engine(loaded):
    engine = Engine(loaded.model, loaded.max_context_length).start()
    yield engine
    engine.shutdown()


def test_logit_bias_bans_and_forces_tokens(engine, tokenizer):
    ids = prompt_ids(tokenizer)
    [(greedy, _)] = run_engine(engine, [(ids, SamplingParams(10, temperature=0.0))])
    banned = greedy[0]
    forced = tokenizer.convert_tokens_to_ids("a")
    results = run_engine(
        engine,
        [
            (ids, SamplingParams(10, temperature=0.0, logit_bias=((banned, -100.0),))),
            (ids, SamplingParams(10, temperature=1.0, seed=1, logit_bias=((forced, 100.0),))),
        ],
    )
    assert banned not in results[0][0] and len(results[0][0]) == 10
    assert results[1][0] == [forced] * 10


def test_penalties_change_a_repetitive_greedy_output(engine, tokenizer):
    ids = prompt_ids(tokenizer)
    jobs = [
        (ids, SamplingParams(40, temperature=0.0)),
        (ids, SamplingParams(40, temperature=0.0, frequency_penalty=2.0)),
        (ids, SamplingParams(40, temperature=0.0, presence_penalty=2.0)),
        (ids, SamplingParams(40, temperature=0.0, repetition_penalty=1.5)),
    ]
    plain, freq, pres, rep = (tokens for tokens, _ in run_engine(engine, jobs))
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    for penalized in (freq, pres, rep):
        assert penalized != plain
        assert max(penalized.count(t) for t in penalized) <= max(plain.count(t) for t in plain)
    assert len(set(pres)) == 40  # presence 2.0 on logits this flat: nothing repeats


def test_min_tokens_holds_eos_back(engine, tokenizer):
    ids = prompt_ids(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|end|>")
    always_eos = ((eos, 100.0),)
    results = run_engine(
        engine,
        [
            (ids, SamplingParams(20, temperature=0.0, stop_token_ids=(eos,), logit_bias=always_eos)),
            (ids, SamplingParams(20, temperature=0.0, stop_token_ids=(eos,), logit_bias=always_eos, min_tokens=5)),
        ],
    )
    assert results[0] == ([eos], "stop")
    tokens, finish = results[1]
    assert (len(tokens), tokens[-1], finish) == (6, eos, "stop") and eos not in tokens[:5]


@pytest.mark.parametrize("eos", [32007, 32001, 32000], ids=["end", "assistant", "endoftext"])
def test_stops_on_each_of_phi35s_eos_ids(loaded, tokenizer, eos):
    """The worker's stop list is the generation config's; forced by a bias, each one ends the sequence,
    and its text is never shown."""
    engine = Engine(loaded.model, loaded.max_context_length, vocab_limit=len(tokenizer)).start()
    params = SamplingParams(9, temperature=0.0, stop_token_ids=tuple(loaded.eos_token_ids), logit_bias=((eos, 100.0),))
    try:
        [(tokens, finish)] = run_engine(engine, [(prompt_ids(tokenizer), params)])
    finally:
        engine.shutdown()
    assert (tokens, finish) == ([eos], "stop")
    stream = TextStream(tokenizer, [])
    assert stream.add(eos) + stream.finish() == ""


def test_padded_vocabulary_rows_are_never_sampled(loaded, tokenizer):
    """Phi-3.5's embedding has 32,064 rows for 32,011 tokens: the 53 past the tokenizer have no text. Even
    biased, they are never drawn; log-probabilities stay the model's own and may name them (no text)."""
    padded = 32050
    engine = Engine(loaded.model, loaded.max_context_length, vocab_limit=len(tokenizer)).start()
    bias = ((padded, 100.0),)
    jobs = [
        (prompt_ids(tokenizer), SamplingParams(6, temperature=0.0, logit_bias=bias, logprobs=2)),
        (prompt_ids(tokenizer), SamplingParams(6, temperature=1.0, seed=1, logit_bias=bias)),
    ]
    try:
        outs = run_full(engine, jobs)
    finally:
        engine.shutdown()
    for tokens, _, finish, _ in outs:
        assert finish == "length" and len(tokens) == 6 and max(tokens) < len(tokenizer)
    assert TokenNames(tokenizer).record(padded, -1.0) == {"token": "", "logprob": -1.0, "bytes": [], "top_logprobs": []}


def test_utf8_across_byte_fallback_tokens(tokenizer):
    """Characters outside Phi-3.5's vocabulary are spelled with <0xNN> byte tokens: the text streams whole
    characters only, and joined equals the full decode."""
    text = "Ação ✓ 𝄞 emoji 🦜 e 漢字"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sum(1 for t in tokenizer.convert_ids_to_tokens(ids) if t.startswith("<0x")) >= 4  # 𝄞 and 🦜
    stream = TextStream(tokenizer, [])
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_top_k_1_is_greedy_and_seeds_repeat(engine, tokenizer):
    ids = prompt_ids(tokenizer)
    jobs = [
        (ids, SamplingParams(12, temperature=0.0)),
        (ids, SamplingParams(12, temperature=2.0, top_k=1, seed=3)),
        (ids, SamplingParams(12, temperature=1.0, seed=42)),
        (ids, SamplingParams(12, temperature=1.0, seed=42, min_p=0.05)),
        (ids, SamplingParams(12, temperature=1.0, seed=43)),
    ]
    first = run_engine(engine, jobs)
    again = run_engine(engine, list(reversed(jobs)))[::-1]
    assert first == again
    assert first[0] == first[1]
    assert first[2][0] != first[4][0]


def test_logprobs_match_the_model(engine, loaded, tokenizer):
    ids = prompt_ids(tokenizer)
    [(tokens, logprobs, finish, _)] = run_full(engine, [(ids, SamplingParams(6, temperature=0.0, logprobs=3))])
    assert (len(tokens), len(logprobs), finish) == (6, 6, "length")
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids + tokens])).logits[0].float()
    expected = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)  # [6, V]: what predicted each token
    for i, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        assert lp.logprob == pytest.approx(expected[i, token].item(), abs=LOGPROB_ATOL)
        assert len(lp.top) == 3 and lp.top[0][0] == token  # greedy: the chosen token is the most likely
        assert [v for _, v in lp.top] == pytest.approx(expected[i].topk(3).values.tolist(), abs=LOGPROB_ATOL)


def test_prompt_logprobs_and_max_tokens_zero(loaded, tokenizer):
    ids = prompt_ids(tokenizer)
    chunked = Engine(loaded.model, loaded.max_context_length, prefill_chunk=7).start()
    try:
        [(tokens, _, finish, stream)] = run_full(chunked, [(ids, SamplingParams(0, prompt_logprobs=2))])
    finally:
        chunked.shutdown()
    assert (tokens, finish) == ([], "length")
    scored = stream.prompt_logprobs
    assert len(scored) == len(ids) and scored[0] is None
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], dim=-1)
    for i, lp in enumerate(scored[1:]):
        assert lp.logprob == pytest.approx(expected[i, ids[i + 1]].item(), abs=LOGPROB_ATOL)
        assert len(lp.top) == 2


def test_submit_many_queues_all_or_none(loaded, tokenizer):
    ids = prompt_ids(tokenizer)
    engine = Engine(loaded.model, loaded.max_context_length, max_queued=3)  # started once the queue is full

    async def scenario():
        jobs = [(ids, SamplingParams(5, temperature=1.0, seed=s)) for s in (1, 2, 3)]
        with pytest.raises(NeverFits, match="at most 3 may wait"):
            engine.submit_many(jobs * 2)
        streams = engine.submit_many(jobs)
        with pytest.raises(EngineFull):
            engine.submit_many(jobs[:1])
        engine.start()
        return [await drain(s) for s in streams]

    try:
        outs = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert len({tuple(o) for o in outs}) == 3 and all(len(o) == 5 for o in outs)


def test_bad_settings_fail_one_request_not_the_batch(engine, tokenizer):
    ids = prompt_ids(tokenizer)

    async def scenario():
        bad = engine.submit(ids, SamplingParams(4, temperature=0.0, logit_bias=((10**6, 1.0),)))
        good = engine.submit(ids, SamplingParams(4, temperature=0.0))
        outs = []
        for stream in (bad, good):
            async for out in stream:
                last = out
            outs.append((last.finish_reason, stream.error))
        return outs

    (bad_finish, bad_error), (good_finish, good_error) = asyncio.run(scenario())
    assert bad_finish == "error" and "IndexError" in bad_error
    assert (good_finish, good_error) == ("length", None)


def test_fused_rotation_gives_transformers_rotation(tiny_model_dir, monkeypatch):
    """The rotary embedding in 4 operations a layer (what the loader routes transformers' Phi-3 rotation
    through on a GPU) against transformers' own: queries and keys of grouped heads, head size 96 as
    Phi-3.5's, equal (float32); the model's logits with it and back equal, 8 operations a layer fewer (the
    signed sine made once a pass: 2 more); on devices not routed, transformers' code runs; it compiles
    whole (server.compile_decode)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM
    from transformers.models.phi3 import modeling_phi3

    from ptserve.engine import rope

    original = modeling_phi3.apply_rotary_pos_emb
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, tokens, dim in ((4, 4, 1, 96), (8, 2, 7, 64)):
        q, k = torch.randn(1, heads, tokens, dim, generator=gen), torch.randn(1, kv_heads, tokens, dim, generator=gen)
        cos, sin = (f(torch.randn(1, tokens, dim, generator=gen)) for f in (torch.cos, torch.sin))
        for got, want in zip(rope.rotate(q, k, cos, sin), original(q, k, cos, sin), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    compiled = torch.compile(rope.rotate, fullgraph=True)  # (server.compile_decode on a GPU traces it)
    for got, want in zip(compiled(q, k, cos, sin), original(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += not func.is_view  # (a view launches nothing)
            return func(*args, **(kwargs or {}))

    def logits_and_ops():
        Count.calls = 0
        with torch.no_grad(), Count():
            logits = model(ids).logits
        return logits, Count.calls

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(100, 140))])
    logits_and_ops()  # (the first pass also sets the rotary embedding up)
    want, plain_ops = logits_and_ops()
    try:
        assert rope.fuse_rotary() and not rope.fuse_rotary()
        assert torch.equal(logits_and_ops()[0], want)  # a CPU tensor: still transformers' rotation
        monkeypatch.setattr(rope, "FUSED_ON", {"cpu"})
        got, fused_ops = logits_and_ops()
    finally:
        assert rope.unfuse_rotary() and not rope.unfuse_rotary()
    assert modeling_phi3.apply_rotary_pos_emb is original
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert plain_ops - fused_ops == 8 * model.config.num_hidden_layers - 2


def test_fused_rms_norms_give_transformers_norms(tiny_model_dir):
    """torch's fused RMSNorm (what the loader swaps in on a GPU) in place of transformers' eight operations:
    every norm of the model swapped and back, the logits equal (float32)."""
    from transformers import AutoModelForCausalLM

    from ptserve.engine import rmsnorm

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(100, 140))])
    with torch.no_grad():
        want = model(ids).logits
        layers = model.config.num_hidden_layers
        assert rmsnorm.fuse(model) == 2 * layers + 1 and rmsnorm.fuse(model) == 0  # each layer's two, the last
        got = model(ids).logits
        assert rmsnorm.unfuse(model) == 2 * layers + 1
        again = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, want)
