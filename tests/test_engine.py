"""The engine's KV pool: paged blocks, one ragged pass per step, prefix caching, preemption.

Units of the block bookkeeping (no model), then the tiny Phi-3.5 (float32) with sharpened attention, where
reading one wrong key moves log-probabilities by units: every path (paged, ragged, chunked, prefix-cached,
preempted and recomputed) gives transformers' eager forward of each request alone.
"""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest
import torch

from ptserve.config import load_config
from ptserve.engine import loader
from ptserve.engine.blocks import NULL_BLOCK, BlockManager, block_keys
from ptserve.engine.sampling import SamplingParams
from ptserve.engine.scheduler import Engine, NeverFits
from ptserve.tinymodel import TinyShape, build
from tests.decoding import RandomDecode, step_args

BS = 16  # the engine's block size
SHARPEN = 8.0  # queries, keys and lm_head scaled up: attention then depends on every key it reads
ATOL = 1e-3  # float32, different matmul shapes than the reference (see tests/test_model.py)


# -- block bookkeeping (no model) ---------------------------------------------------------------------
def test_blocks_are_handed_out_once_and_the_null_block_never():
    m = BlockManager(5, 4)
    assert (m.usable, m.free, m.used) == (4, 4, 0)
    first = m.allocate(3)
    assert sorted(first) == [1, 2, 3] and NULL_BLOCK not in first
    assert m.take_fresh() == first and m.take_fresh() == []  # never-used memory: the caller zeroes it
    assert m.allocate(2) is None and m.free == 1  # not enough: nothing taken
    m.release(first)
    again = m.allocate(4)
    assert sorted(again) == [1, 2, 3, 4] and m.take_fresh() == [4]  # released ones are reused first
    assert (m.free, m.used) == (0, 4)


def test_a_reserved_block_is_never_handed_out_nor_counted():
    m = BlockManager(4, 4)
    scratch = m.reserve()
    assert scratch == 1 and (m.usable, m.free, m.used) == (2, 2, 0)
    assert sorted(m.allocate(2)) == [2, 3] and m.allocate(1) is None
    with pytest.raises(ValueError, match="never-used"):
        m.reserve()
    with pytest.raises(ValueError, match="too few"):
        BlockManager(2, 4).reserve()  # the null block and one more: nothing to spare


def test_block_keys_name_the_whole_prefix():
    a = list(range(40))
    b = [7] * 8 + list(range(8, 40))  # same second block, different first
    assert len(block_keys(a, 16)) == 2  # the partial third block has no key
    assert block_keys(a, 16)[0] != block_keys(b, 16)[0]
    assert block_keys(a, 16)[1] != block_keys(b, 16)[1]  # equal tokens after a different prefix
    assert block_keys(a, 16, block_keys(a[:16], 16)[0], 1) == block_keys(a, 16)[1:]  # chained from a key


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_a_chunk_attends_to_its_prefix_and_itself_as_one_masked_call(heads, kv_heads):
    """After cached or earlier-computed tokens, a chunk's attention is two unmasked kernel calls (the
    keys before it, its own causally) merged by log-sum-exp: equal to one call with the causal mask,
    for any start (mid-block too) and grouped-query heads. That one masked call is the GPU's path without
    FlashAttention's varlen kernel (`_masked_chunk`): it gives the same."""
    from ptserve.engine.paged import _masked_chunk, _two_part

    gen = torch.Generator().manual_seed(0)
    for before, n in ((16, 5), (37, 9), (100, 1)):
        q = torch.randn(1, heads, n, 8, generator=gen)
        k = torch.randn(1, kv_heads, before + n, 8, generator=gen)
        v = torch.randn(1, kv_heads, before + n, 8, generator=gen)
        got = _two_part(
            q, k[:, :, :before], v[:, :, :before], k[:, :, before:], v[:, :, before:], 0.35, heads != kv_heads
        )
        mask = torch.arange(before + n).unsqueeze(0) <= before + torch.arange(n).unsqueeze(1)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=0.35, enable_gqa=heads != kv_heads
        )
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        parts = (k[:, :, :before], v[:, :, :before], k[:, :, before:], v[:, :, before:])
        torch.testing.assert_close(_masked_chunk(q, *parts, 0.35, heads != kv_heads), want, atol=1e-6, rtol=1e-5)


def test_decoding_rows_are_grouped_by_length_and_read_only_their_groups_blocks():
    """On the CPU path, rows with one new token are attended GROUP at a time, shortest first: a group
    gathers as many blocks as its own longest row holds, not the batch's longest (one 3k-token chat among
    63 short ones made every group read ~190 blocks)."""
    from ptserve.engine.paged import GROUP, KVPool, PagedBatch

    pool = KVPool(1, 64, BS, 1, 4, torch.float32, "cpu")
    ends = [300, 20, 40, 20, 17, 100]  # tokens of each row with its new one
    rows, next_block = [], 1
    for end in ends:
        blocks = -(-end // BS)
        rows.append((end - 1, 1, list(range(next_block, next_block + blocks))))
        next_block += blocks
    rows.insert(2, (0, 5, [next_block]))  # a prompt chunk among them: batch position 2, 5 tokens
    batch = PagedBatch.build(pool, rows, use_varlen=False)
    positions = [0, 1, 7, 8, 9, 10]  # each decoding row's batch position (the chunk takes 2-6)
    order = sorted(range(len(ends)), key=ends.__getitem__)
    assert batch.single_idx.tolist() == [positions[i] for i in order]
    assert GROUP == 4 and batch.groups == [(0, 4, 3), (4, 6, 19)]  # 17, 20, 20, 40 tokens; then 100, 300
    assert batch.single_tables.shape == (6, 19) and batch.single_tables[0, 2:].eq(NULL_BLOCK).all()


def assert_each_row_alone(pool, rows, q, out, scale=0.3):
    """`out` [1, T, H, D] of a pass over `rows` (start, new tokens, table) is each row's attention alone over
    its own keys, read back from the pool after the pass wrote them, causal over its new ones."""
    offset = 0
    for start, n, table in rows:
        end = start + n
        keys = pool.keys[0][table].flatten(0, 1)[:end].transpose(0, 1).unsqueeze(0)  # [1, kvh, end, D]
        values = pool.values[0][table].flatten(0, 1)[:end].transpose(0, 1).unsqueeze(0)
        mask = torch.arange(end).unsqueeze(0) <= start + torch.arange(n).unsqueeze(1)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, offset : offset + n], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        torch.testing.assert_close(out[0, offset : offset + n], want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        offset += n


def test_a_ragged_pass_attends_each_row_to_exactly_its_own_tokens():
    """The CPU path's numbers for a mixed pass (decoding rows out of length order, in groups of four and a
    last group of two, and prompt chunks from position 0 and after cached blocks) against attention of each
    row alone over its own keys, read back from the pool after the pass wrote them."""
    from ptserve.engine.paged import KVPool, PagedBatch, paged_attention

    heads, kv_heads, size = 4, 2, 8
    pool = KVPool(1, 64, BS, kv_heads, size, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    for store in pool.keys + pool.values:
        store.normal_(generator=gen)
    # (tokens before this pass, new tokens): decoding rows of 70, 5, 33, 18, 100, 2 tokens, two chunks
    shapes = [(69, 1), (4, 1), (0, 9), (32, 1), (17, 1), (20, 7), (99, 1), (1, 1)]
    rows, free = [], iter(torch.randperm(63, generator=gen).add(1).tolist())
    for start, n in shapes:
        rows.append((start, n, [next(free) for _ in range(-(-(start + n) // BS))]))
    total = sum(n for _, n in shapes)
    q = torch.randn(1, heads, total, size, generator=gen)
    k = torch.randn(1, kv_heads, total, size, generator=gen)
    v = torch.randn(1, kv_heads, total, size, generator=gen)
    layer = type("Layer", (), {"layer_idx": 0})()
    out, _ = paged_attention(layer, q, k, v, None, 0.3, paged=PagedBatch.build(pool, rows, use_varlen=False))
    assert_each_row_alone(pool, rows, q, out)


def test_on_a_gpu_decoding_rows_share_calls_up_to_the_gather_bound(monkeypatch):
    """On a GPU, decoding rows (shortest first) go into as few gather + SDPA calls as GPU_GATHER_TOKENS
    allows: all of them while their padded copy fits, a long row alone, one row a call at least. Run on the
    CPU with those calls (uneven ones), the pass gives each row's attention alone."""
    from ptserve.engine import paged
    from ptserve.engine.paged import KVPool, PagedBatch, paged_attention

    gpu = torch.device("cuda")  # a device type only: nothing runs there
    assert (paged.GPU_GATHER_TOKENS, paged.GPU_CALL_TOKENS, paged.GPU_GROUP) == (1 << 17, 1 << 14, None)
    assert paged._groups(gpu, [128] * 64, 16) == [(0, 64, 128)]  # 64 rows of 2k tokens: one call
    assert paged._groups(gpu, [8] * 63 + [8192], 16) == [(0, 63, 8), (63, 64, 8192)]  # a 128k-token row
    assert paged._groups(gpu, [9000, 9000], 16) == [(0, 1, 9000), (1, 2, 9000)]  # over the bound: alone
    # 63 rows of 100 tokens and one of 2,000: padding the 63 to 2,000 would gather 119k tokens for nothing
    assert paged._groups(gpu, [7] * 63 + [125], 16) == [(0, 63, 7), (63, 64, 125)]
    assert paged._groups(gpu, [7] * 63 + [20], 16) == [(0, 64, 20)]  # 13k tokens of padding: one call
    assert paged._groups(torch.device("cpu"), [1, 2, 2, 3, 7], 16) == [(0, 4, 3), (4, 5, 7)]

    monkeypatch.setattr(paged, "GPU_GATHER_TOKENS", 6 * BS)  # calls of 3, 1 and 1 rows below
    heads, kv_heads, size = 4, 2, 8
    pool = KVPool(1, 64, BS, kv_heads, size, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(3)
    for store in pool.keys + pool.values:
        store.normal_(generator=gen)
    shapes = [(40, 1), (3, 1), (20, 1), (90, 1), (0, 6), (10, 1)]  # 1, 1, 2, 3 and 6 blocks; a chunk
    rows, free = [], iter(torch.randperm(63, generator=gen).add(1).tolist())
    for start, n in shapes:
        rows.append((start, n, [next(free) for _ in range(-(-(start + n) // BS))]))
    batch = PagedBatch.build(pool, rows, use_varlen=False)
    batch.groups = paged._groups(gpu, [len(t) for t in sorted((r[2] for r in rows if r[1] == 1), key=len)], BS)
    assert batch.groups == [(0, 3, 2), (3, 4, 3), (4, 5, 6)]
    total = sum(n for _, n in shapes)
    q = torch.randn(1, heads, total, size, generator=gen)
    k = torch.randn(1, kv_heads, total, size, generator=gen)
    v = torch.randn(1, kv_heads, total, size, generator=gen)
    layer = type("Layer", (), {"layer_idx": 0})()
    out, _ = paged_attention(layer, q, k, v, None, 0.3, paged=batch)
    assert_each_row_alone(pool, rows, q, out)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_runs_of_consecutive_blocks_are_read_in_place_and_change_nothing(monkeypatch, heads, kv_heads):
    """Decoding rows whose tables hold runs of consecutive blocks (as prompts are allocated) attend alone,
    reading them as views of the pool and gathering only the rest; the others are grouped as before. Same
    numbers as attention of each row alone over its own keys (grouped-query heads too)."""
    from ptserve.engine import paged
    from ptserve.engine.paged import KVPool, PagedBatch, paged_attention

    size = 8
    pool = KVPool(1, 64, BS, kv_heads, size, torch.float32, "cpu")
    monkeypatch.setattr(paged, "MIN_RUN_BYTES", 2 * pool.block_bytes)  # runs of 2 blocks or more
    monkeypatch.setattr(paged, "MIN_ROW_BYTES", 3 * pool.block_bytes)  # holding 3 blocks or more
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # any host: no fewer key heads than threads
    gen = torch.Generator().manual_seed(1)
    for store in pool.keys + pool.values:
        store.normal_(generator=gen)
    # (tokens before this pass, new tokens, table): runs, single blocks between them, a partly filled last
    # block in a run or alone; rows grouped as before (no run, too little in runs); prompt chunks
    shapes = [
        (69, 1, [10, 11, 12, 30, 31]),  # a run of 3, then a run of 2 holding 16 + 6 tokens
        (50, 1, [20, 21, 22, 40]),  # a run, then the partly filled last block alone
        (33, 1, [50, 2, 4]),  # no run: grouped
        (50, 1, [5, 33, 34, 35, 36]),  # a single block, then a run
        (40, 1, [23, 24, 41]),  # a run of 2 blocks only: grouped
        (36, 7, [14, 15, 16, 60]),  # a chunk from mid-block 2
        (0, 5, [7]),
    ]
    rows = [(start, n, table) for start, n, table in shapes]
    total = sum(n for _, n, _ in shapes)
    q = torch.randn(1, heads, total, size, generator=gen)
    k = torch.randn(1, kv_heads, total, size, generator=gen)
    v = torch.randn(1, kv_heads, total, size, generator=gen)
    batch = PagedBatch.build(pool, rows, use_varlen=False)
    assert [position for position, _ in batch.alone] == [0, 1, 3]
    assert batch.alone[0][1].runs == [(10, 48), (30, 22)] and batch.alone[0][1].rest is None
    assert batch.alone[1][1].runs == [(20, 48)] and batch.alone[1][1].rest.tolist() == [40]
    assert batch.alone[1][1].rest_tokens == 3
    assert batch.alone[2][1].runs == [(33, 35)] and batch.alone[2][1].rest.tolist() == [5]
    assert batch.alone[2][1].rest_tokens == 16
    assert batch.single_idx.tolist() == [2, 4]
    layer = type("Layer", (), {"layer_idx": 0})()
    out, _ = paged_attention(layer, q, k, v, None, 0.3, paged=batch)
    assert_each_row_alone(pool, rows, q, out)


def test_prefix_lookup_references_and_lru_eviction():
    m = BlockManager(5, 4)  # 4 usable blocks
    keys = block_keys(list(range(12)), 4)
    blocks = m.allocate(3)
    for block, key in zip(blocks, keys, strict=True):
        assert m.register(block, key)
    assert not m.register(m.allocate(1)[0], keys[0])  # a prefix already held elsewhere stays private
    m.release(blocks)
    assert (m.cached, m.used) == (3, 1)
    assert m.lookup(keys[:2] + [b"other"]) == blocks[:2]  # the longest cached prefix, now referenced
    assert m.used == 3
    # one block is free and cached (blocks[2]): it is the one evicted when a block is needed
    assert m.allocate(1) == [blocks[2]] and m.evictions == 1
    assert m.lookup(keys) == blocks[:2]  # the third key is gone
    m.unregister(blocks[0])
    assert m.lookup(keys) == []


# -- the engine on a sharpened tiny model --------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    """A tiny Phi-3.5 whose attention is sharp: at initialization scale it is nearly uniform, and a wrong
    key would hardly show."""
    from safetensors.torch import load_file, save_file

    path = build(tmp_path_factory.mktemp("sharp"))
    weights = load_file(path / "model.safetensors")
    hidden = TinyShape().hidden
    for name, tensor in weights.items():
        if name.endswith("qkv_proj.weight"):
            tensor[: 2 * hidden] *= SHARPEN
        elif name == "lm_head.weight":
            tensor *= SHARPEN
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def load_sharp(path, **server):
    overrides = {("model", "id"): str(path), ("model", "dtype"): "float32", ("model", "max_context_length"): 4096}
    overrides.update({("server", k): v for k, v in server.items()})
    return loader.load(load_config(None, environ={}, overrides=overrides)).model


@pytest.fixture(scope="module")
def sharp(sharp_dir):
    return load_sharp(sharp_dir)


@pytest.fixture(scope="module")
def sharp_compilable(sharp_dir):
    """Loaded as for server.compile_decode: float32 linears not re-packed for oneDNN (inductor cannot
    lower that op; it does its own)."""
    return load_sharp(sharp_dir, compile_decode=True)


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 30000, (n,), generator=gen).tolist() for n in lengths]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(n, temperature=0.0, **kw)


def eager_logprobs(model, ids: list[int]) -> list[float]:
    """transformers' eager forward of one sequence: the log-probability of each token after the first."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


async def collect(stream):
    tokens, logprobs, finish = [], [], None
    async for out in stream:
        tokens += out.token_ids
        logprobs += [lp.logprob for lp in out.logprobs or []]
        finish = out.finish_reason
    return tokens, logprobs, finish


def run(engine: Engine, jobs, stagger: float = 0.0):
    """Submit (ids, params) jobs (the k-th after k x stagger seconds); [(tokens, logprobs, finish, stream)]."""

    async def one(k, ids, params):
        await asyncio.sleep(stagger * k)
        stream = engine.submit(ids, params)
        return (*await collect(stream), stream)

    async def scenario():
        return await asyncio.gather(*(one(k, ids, p) for k, (ids, p) in enumerate(jobs)))

    return asyncio.run(scenario())


def settle(engine: Engine) -> None:
    """Wait until the engine has retired everything (the last token is published before retirement)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (engine.running or engine.blocks.used):
        time.sleep(0.005)


def assert_matches_eager(model, ids, tokens, logprobs, prompt_logprobs=None):
    """The request's generated (and prompt) log-probabilities are those of transformers' forward alone."""
    reference = eager_logprobs(model, ids + tokens)
    assert logprobs == pytest.approx(reference[len(ids) - 1 :], abs=ATOL)
    if prompt_logprobs is not None:
        assert [lp.logprob for lp in prompt_logprobs[1:]] == pytest.approx(reference[: len(ids) - 1], abs=ATOL)


@pytest.fixture(params=["gathered", "in place"])
def reading(request, monkeypatch):
    """How the CPU path reads a row's earlier keys: gathered (the tiny model's runs of blocks are far below
    paged.MIN_RUN_BYTES), or every run of consecutive blocks of a decoding row in place."""
    if request.param == "in place":
        from ptserve.engine import paged

        monkeypatch.setattr(paged, "MIN_RUN_BYTES", 0)
        monkeypatch.setattr(paged, "MIN_ROW_BYTES", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # any host: no fewer key heads than threads
    return request.param


def test_ragged_chunked_paged_passes_equal_each_request_alone(sharp, reading):
    """Requests of lengths across block boundaries, arriving while others run, prompts in 7-token chunks:
    prefill chunks and decoding rows share passes and blocks sit anywhere in the pool."""
    ids = prompts(5, 16, 17, 40, 90)
    engine = Engine(sharp, 4096, prefill_chunk=7).start()
    try:
        results = run(engine, [(p, greedy(12, logprobs=0, prompt_logprobs=0)) for p in ids], stagger=0.01)
    finally:
        engine.shutdown()
    for p, (tokens, logprobs, finish, stream) in zip(ids, results, strict=True):
        assert (len(tokens), finish) == (12, "length")
        assert_matches_eager(sharp, p, tokens, logprobs, stream.prompt_logprobs)


def test_prefix_cache_reuses_a_conversation_and_changes_nothing(sharp, reading):
    """Turn 2 resends turn 1 (prompt and answer) plus a new message: the full blocks of what turn 1
    computed are reused; tokens and log-probabilities are those computed without the cache."""
    first, more = prompts(70, 30)
    outputs = {}
    for caching in (True, False):
        engine = Engine(sharp, 4096, prefix_caching=caching).start()
        try:
            [(answer, _, _, s1)] = run(engine, [(first, greedy(8, logprobs=0))])
            second = first + answer + more
            [(tokens, logprobs, _, s2)] = run(engine, [(second, greedy(8, logprobs=0))])
            settle(engine)
            outputs[caching] = (answer, tokens, logprobs, s1.cached_tokens, s2.cached_tokens, engine.blocks.used)
        finally:
            engine.shutdown()
    answer, tokens, logprobs, cached1, cached2, used = outputs[True]
    # turn 1 computed its 70 prompt tokens and 7 of its 8 answer tokens (the last one is only sampled):
    # 4 full blocks of 16
    assert (cached1, cached2, used) == (0, 64, 0)
    assert outputs[False][3:] == (0, 0, 0)
    assert tokens == outputs[False][1] and answer == outputs[False][0]
    assert logprobs == pytest.approx(outputs[False][2], abs=ATOL)
    assert_matches_eager(sharp, first + answer + more, tokens, logprobs)


def test_n_choices_of_one_prompt_share_its_prefill(sharp):
    [ids] = prompts(50)
    engine = Engine(sharp, 4096).start()
    try:

        async def scenario():
            streams = engine.submit_many([(ids, greedy(6, logprobs=0))] * 3)
            return await asyncio.gather(*(collect(s) for s in streams)), streams

        outs, streams = asyncio.run(scenario())
    finally:
        engine.shutdown()
    # admitted in one pass: the first computes the prompt's 3 full blocks, the others read them as it writes
    assert [s.cached_tokens for s in streams] == [0, 48, 48]
    # the same tokens; log-probabilities to float32 rounding (the readers attend to the cached blocks and
    # their own keys in two kernel calls, the writer in one)
    assert [o[0] for o in outs] == [outs[0][0]] * 3 and [o[2] for o in outs] == [outs[0][2]] * 3
    for other in outs[1:]:
        assert other[1] == pytest.approx(outs[0][1], abs=1e-5)
    assert_matches_eager(sharp, ids, outs[0][0], outs[0][1])


def test_a_prompt_that_fits_one_pass_is_not_split_with_another(sharp):
    """Requests arriving together: a prompt that fits one pass waits for the next rather than taking what
    is left of this one (each then gets its first token a pass sooner or as soon); a prompt longer than a
    pass is chunked from whatever is left, as before. Outputs equal each request alone."""
    engine = Engine(sharp, 4096, prefill_chunk=64)
    passes = []
    step = engine._pass

    def recording(plan):
        passes.append([(len(row.stream.prompt_ids), n) for row, n in plan])
        return step(plan)

    engine._pass = recording
    ids = prompts(40, 40, 100)

    async def scenario():
        streams = engine.submit_many([(p, greedy(2, logprobs=0)) for p in ids])
        engine.start()  # all three are queued before the first pass
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        outs = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert passes[:2] == [[(40, 40)], [(40, 1), (40, 40), (100, 24)]]  # old: [(40, 40), (40, 24)] first
    for p, (tokens, logprobs, finish) in zip(ids, outs, strict=True):
        assert finish == "length"
        assert_matches_eager(sharp, p, tokens, logprobs)


def test_preemption_recomputes_and_changes_nothing(sharp, reading):
    """A pool too small for every running sequence to grow: the latest admitted are preempted, wait, and
    are recomputed; greedy and seeded outputs are those of each request alone."""
    ids = prompts(20, 24, 28, 33)
    jobs = [(p, greedy(40, logprobs=0)) for p in ids[:2]]
    jobs += [(p, SamplingParams(40, temperature=1.0, seed=7, logprobs=0)) for p in ids[2:]]
    roomy = Engine(sharp, 4096).start()
    try:
        alone = [run(roomy, [job])[0][:3] for job in jobs]
    finally:
        roomy.shutdown()
    # 11 usable blocks; each sequence ends up needing 4 (up to 73 tokens): at most two grow at once
    engine = Engine(sharp, 4096, kv_budget_bytes=12 * roomy.bytes_per_block, prefix_caching=False).start()
    try:
        together = [r[:3] for r in run(engine, jobs)]
        settle(engine)
    finally:
        engine.shutdown()
    assert engine.preemptions > 0
    for (tokens, logprobs, finish), (ref_tokens, ref_logprobs, ref_finish) in zip(together, alone, strict=True):
        assert (tokens, finish) == (ref_tokens, ref_finish)
        assert logprobs == pytest.approx(ref_logprobs, abs=ATOL)
    assert engine.blocks.used == 0


def cancel_one_of_two(engine: Engine) -> tuple[list[int], str]:
    """Start `engine`, run a long request cancelled at its first token beside a short one; the short one's
    tokens and finish, once the engine has settled (then it is shut down)."""
    ids = prompts(40, 60)
    engine.start()
    try:

        async def scenario():
            long = engine.submit(ids[0], greedy(2000))
            short = engine.submit(ids[1], greedy(3))
            async for _ in long:
                long.cancel()
            return await collect(short)

        tokens, _, finish = asyncio.run(scenario())
        settle(engine)
    finally:
        engine.shutdown()
    return tokens, finish


def test_cancelled_and_finished_requests_free_their_blocks(sharp):
    engine = Engine(sharp, 4096, prefix_caching=False)
    tokens, finish = cancel_one_of_two(engine)
    assert (len(tokens), finish) == (3, "length")
    assert (engine.running, engine.blocks.used, engine.blocks.free) == (0, 0, engine.blocks.usable)


def test_cached_blocks_are_evicted_least_recently_used_first(sharp):
    a, b, c = prompts(33, 33, 33)
    engine = Engine(sharp, 4096, kv_budget_bytes=10 * Engine(sharp, 64, kv_budget_bytes=1 << 20).bytes_per_block)
    engine.start()
    try:
        [(ref_a, _, _, _)] = run(engine, [(a, greedy(4))])  # a's 2 full blocks cached
        [(_, _, _, s)] = run(engine, [(a, greedy(4))])
        assert s.cached_tokens == 32
        run(engine, [(b, greedy(4))])  # b's 2 cached too; 9 usable blocks, 3 per sequence
        run(engine, [(a, greedy(4))])  # a used again: b is now the least recently used
        run(engine, [(c, greedy(80))])  # 112 tokens: 7 blocks, the 5 never cached, then b's two
        settle(engine)
        [(again, _, _, sa)] = run(engine, [(a, greedy(4))])
        [(_, _, _, sb)] = run(engine, [(b, greedy(4))])
    finally:
        engine.shutdown()
    assert engine.blocks.evictions > 0
    assert (sb.cached_tokens, sa.cached_tokens) == (0, 32)
    assert again == ref_a


def test_the_pool_is_the_budget_in_whole_blocks_allocated_once(sharp):
    probe = Engine(sharp, 4096, kv_budget_bytes=1 << 20)
    per_block = probe.bytes_per_block
    assert per_block == 2 * 2 * 4 * 16 * 4 * BS  # keys and values x layers x kv heads x head size x float32
    engine = Engine(sharp, 4096, kv_budget_bytes=int(10.5 * per_block)).start()
    storage = [t.data_ptr() for t in engine.pool.keys + engine.pool.values]
    try:
        assert engine.pool.nbytes == 10 * per_block  # the budget, rounded down to whole blocks
        assert engine.kv_budget_tokens == 9 * BS  # the null block pads block tables
        assert engine.blocks.touched == 1  # only the null block has been written
        for ids in prompts(20, 30, 45):
            run(engine, [(ids, greedy(5))])
        settle(engine)
        assert [t.data_ptr() for t in engine.pool.keys + engine.pool.values] == storage  # never reallocated
        assert engine.blocks.used == 0
        # 2, 3 and 4 blocks for the three in turn; each one's last, partial block (not cached) is reused by
        # the next, their full blocks stay cached: 2 + 2 + 3 blocks written, and the null block
        assert engine.blocks.touched == 8
    finally:
        engine.shutdown()


def test_what_never_fits_is_refused_and_what_fits_waits_for_blocks(sharp):
    ids = prompts(30)[0]
    per_block = Engine(sharp, 4096, kv_budget_bytes=1 << 20).bytes_per_block
    engine = Engine(sharp, 4096, kv_budget_bytes=7 * per_block).start()  # 6 usable blocks: 96 tokens

    async def scenario():
        with pytest.raises(NeverFits, match="whole cache holds 96"):
            engine.submit(ids, greedy(70))
        streams = [engine.submit(ids, greedy(8)) for _ in range(5)]
        return [await collect(s) for s in streams]

    try:
        results = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert all(r == results[0] and len(r[0]) == 8 for r in results)


def test_a_request_that_needs_the_whole_pool_runs_once_it_is_alone(sharp):
    """Blocks are kept back for running rows to grow into when admitting, but not when nothing runs: a
    request that needs every block of the pool would otherwise wait for ever."""
    small, whole = prompts(10, 90)
    per_block = Engine(sharp, 4096, kv_budget_bytes=1 << 20).bytes_per_block
    engine = Engine(sharp, 4096, kv_budget_bytes=7 * per_block, prefix_caching=False).start()  # 6 usable

    async def scenario():
        first = engine.submit(small, greedy(20))
        last = engine.submit(whole, greedy(6))  # 96 tokens: all 6 blocks
        return await asyncio.wait_for(asyncio.gather(collect(first), collect(last)), 60)

    try:
        (a, _, fa), (b, _, fb) = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert (len(a), fa, len(b), fb) == (20, "length", 6, "length")


def test_prompt_logprobs_are_computed_not_read_from_the_cache(sharp):
    [ids] = prompts(50)
    engine = Engine(sharp, 4096).start()
    try:
        first = run(engine, [(ids, greedy(2, prompt_logprobs=0))])[0][3]
        second = run(engine, [(ids, greedy(2, prompt_logprobs=0))])[0][3]
        third = run(engine, [(ids, greedy(2))])[0][3]
    finally:
        engine.shutdown()
    assert (first.cached_tokens, second.cached_tokens, third.cached_tokens) == (0, 0, 48)
    assert len(second.prompt_logprobs) == len(ids)
    assert [lp and lp.logprob for lp in first.prompt_logprobs] == [lp and lp.logprob for lp in second.prompt_logprobs]


def test_a_failed_prefill_leaves_nothing_in_the_prefix_cache(sharp):
    [ids] = prompts(50)
    engine = Engine(sharp, 4096).start()
    real, calls = engine._forward, itertools.count()

    def forward(batch, input_ids, position_ids, prefill):
        if next(calls) == 0:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return real(batch, input_ids, position_ids, prefill)

    engine._forward = forward
    try:
        [(_, _, failed, _)] = run(engine, [(ids, greedy(4))])
        [(tokens, logprobs, finish, stream)] = run(engine, [(ids, greedy(4, logprobs=0))])
        settle(engine)
    finally:
        engine.shutdown()
    assert failed == "error"
    assert (stream.cached_tokens, finish, engine.blocks.used) == (0, "length", 0)
    assert_matches_eager(sharp, ids, tokens, logprobs)


def test_a_failed_pass_forgets_only_what_it_offered_the_cache(sharp):
    """A request whose pass fails takes its own new blocks out of the prefix cache, not the cached prefix
    it was reusing (the system prompt of everyone else)."""
    shared, tail = prompts(40, 30)
    engine = Engine(sharp, 4096).start()
    real, calls = engine._forward, itertools.count()

    def forward(batch, input_ids, position_ids, prefill):
        if next(calls) == 1:  # the first request's one pass runs (it wants one token); the second's fails
            raise torch.OutOfMemoryError("out of memory (injected)")
        return real(batch, input_ids, position_ids, prefill)

    engine._forward = forward
    try:
        [(_, _, first, _)] = run(engine, [(shared, greedy(1))])
        [(_, _, failed, s1)] = run(engine, [(shared + tail, greedy(4))])
        [(_, _, _, s2)] = run(engine, [(shared + tail, greedy(4))])
        settle(engine)
    finally:
        engine.shutdown()
    assert (first, failed) == ("length", "error")
    assert (s1.cached_tokens, s2.cached_tokens) == (32, 32)  # the shared 2 blocks; the failed tail forgotten


# -- graph-safe decode ---------------------------------------------------------------------------------
def test_compiled_decode_answers_as_the_eager_engine(sharp_compilable):
    sharp = sharp_compilable
    ids = prompts(20, 27, 35)
    jobs = [(p, greedy(n, logprobs=0)) for p, n in zip(ids, (24, 12, 18), strict=True)]  # rows leave early
    answers = {}
    for compiled in (False, True):
        engine = Engine(sharp, 4096, compile_decode=compiled).start()
        try:
            answers[compiled] = [r[:3] for r in run(engine, jobs)]
        finally:
            engine.shutdown()
    for (tokens, logprobs, finish), (ref_tokens, ref_logprobs, ref_finish) in zip(
        answers[True], answers[False], strict=True
    ):
        assert (tokens, finish) == (ref_tokens, ref_finish)
        assert logprobs == pytest.approx(ref_logprobs, abs=ATOL)


def test_decode_step_compiles_once_per_bucket_and_never_again(sharp_compilable):
    """The decoding pass traces whole (fullgraph, static shapes: no data-dependent branch, LongRoPE's
    included) and, once each bucket of rows x blocks is compiled, 60 passes of other tokens, positions,
    block tables and lengths, switching buckets, never recompile, and equal the eager pass."""
    engine = Engine(sharp_compilable, 4096, compile_decode=True)  # not started: its decode step driven directly
    random_decode = RandomDecode(engine, seed=3)

    def inputs(rows: int, width: int):
        return step_args(*random_decode(rows, width))

    buckets = [(4, 2), (1, 4), (8, 2)]
    with torch.inference_mode():
        for rows, width in buckets:  # warm-up: one compilation per bucket
            engine._decode(*inputs(rows, width))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(60):
                args = inputs(*buckets[step % len(buckets)])
                compiled = engine._decode(*args)
                eager = engine._decode_step(*args)
                assert compiled.shape == (args[0].shape[1], TinyShape().hidden)
                torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_a_gpus_compiled_decode_compiles_once_for_every_bucket(sharp_compilable, monkeypatch):
    """The decoding pass as a GPU compiles it (server.compile_decode there): its rows and blocks dimensions
    symbolic, the rows in one gather call, the rotation in 4 kernels (rope.fuse_rotary, as the loader routes
    it on a GPU), run from static buffers (graphs.py; here eagerly, on a GPU captured) — one compile serves
    every bucket from 2 rows x 2 blocks on, powers of two or not, while eager passes between them change
    the rotation's cached sine, and every pass equals the eager one."""
    from ptserve.engine import rope
    from ptserve.engine.graphs import DecodeGraphs

    engine = Engine(sharp_compilable, 4096)
    engine._one_call, engine._min_bucket = True, 2  # as on a GPU
    engine._decode = torch.compile(engine._decode_step, fullgraph=True)
    graphs = DecodeGraphs(engine._marked_decode, engine.device, capture=False)
    inputs = RandomDecode(engine, seed=4)
    monkeypatch.setattr(rope, "FUSED_ON", {"cpu"})
    assert rope.fuse_rotary()

    buckets = [(2, 2), (4, 2), (2, 4), (8, 4), (16, 8), (3, 5), (64, 2)]
    try:
        with torch.inference_mode():
            for k, (rows, width) in enumerate(buckets):
                ids, positions, slots, lens, tables = inputs(rows, width)
                want = engine._decode_step(*step_args(ids, positions, slots, lens, tables))  # (eager: a new sine)
                with torch._dynamo.config.patch(error_on_recompile=k > 0):  # the first call compiles, no other
                    got = graphs(ids.tolist(), positions.tolist(), slots.tolist(), lens.tolist(), tables.tolist())
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        rope.unfuse_rotary()


def test_compiled_decode_updates_the_pool_in_place(sharp_compilable):
    """A bucket's padded rows write a scratch block set aside for them, not the null block: re-zeroing
    that inside the compiled step made inductor copy each layer's whole pool at every pass (a loop over
    all of a layer's pool in the generated code; 49 ms a pass where 0.6 ms is the work). The null block
    stays zero, the scratch block is not usable for sequences."""
    from torch._inductor.utils import run_and_get_code

    from ptserve.engine.scheduler import _Row

    engine = Engine(sharp_compilable, 4096, compile_decode=True)
    assert engine.blocks.usable == engine.blocks.num_blocks - 2 and engine._scratch != NULL_BLOCK
    rows = []
    for i, n in enumerate((20, 35, 17)):  # 3 rows: a bucket of 4, one padded
        row = _Row(None, None, 8, prompts(n + 1, seed=i)[0], i)
        row.computed, row.blocks, row.decoding = n, engine.blocks.allocate(-(-(n + 1) // BS)), True
        rows.append(row)
    engine.pool.zero(engine.blocks.take_fresh())
    with torch.inference_mode():
        _, code = run_and_get_code(engine._bucketed_decode, [(r, 1) for r in rows])
    layer = engine.pool.keys[0].numel()
    assert f"{layer}L" not in "\n".join(code)  # no loop over a layer's whole pool
    for store in engine.pool.keys + engine.pool.values:
        assert not store[NULL_BLOCK].any()
        assert store[engine._scratch, 0].any()  # the padded row's keys went there


def test_graph_decode_answers_as_the_eager_engine(sharp):
    """Decoding passes from static buffers (a CUDA graph's on CUDA; here the same buffers run eagerly, the
    output buffer overwritten by every pass as a graph's is): the same tokens and log-probabilities as
    the eager engine while rows leave and the buckets of rows and blocks change."""
    ids = prompts(20, 27, 35)
    jobs = [(p, greedy(n, logprobs=0)) for p, n in zip(ids, (24, 12, 40), strict=True)]  # rows leave early
    answers, buckets = {}, None
    for graphs in (False, True):
        engine = Engine(sharp, 4096, decode_graphs=graphs).start()
        try:
            answers[graphs] = [r[:3] for r in run(engine, jobs)]
            if graphs:
                buckets = sorted(engine._graphs.buckets)
        finally:
            engine.shutdown()
    assert answers[True] == [(t, pytest.approx(lp, abs=ATOL), f) for t, lp, f in answers[False]]
    # (rows, blocks): (1, 1) the start-up check's; 3 rows of up to 4 blocks, 2 (27 + 12 tokens), 1 past 64
    assert buckets == [(1, 1), (1, 4), (1, 8), (2, 4), (4, 4)]


def test_the_decoding_pass_holds_nothing_a_cuda_graph_cannot(sharp):
    """No operation of the decoding pass waits for the device or copies host data (a CUDA graph cannot
    hold those), as transformers' Phi-3 code runs it eagerly with LongRoPE pinned; the check itself finds
    each kind."""
    from ptserve.engine.graphs import host_syncs

    engine = Engine(sharp, 4096, decode_graphs=True)
    assert engine._graphs is not None  # the start-up check passed
    tables = torch.tensor([[b, NULL_BLOCK] for b in engine.blocks.allocate(4)])  # 4 rows, 2 blocks each
    lens = torch.tensor([3, 16, 1, 9])
    args = (torch.tensor([[5, 6, 7, 8]]), (lens - 1).unsqueeze(0), tables[:, 0] * BS + lens - 1, tables, lens)
    with torch.inference_mode():
        assert host_syncs(engine._decode_step, *args) == []

    def set_masked(x):
        x.clone()[x > 1] = 0

    counts = torch.tensor([1, 2, 1, 0])
    checks = [  # (the pass's operation, what the check calls it)
        (lambda x: x.sum().item(), "item"),
        (lambda x: int(x.sum()), "item"),
        (lambda x: x[x > 1], "index by a boolean mask"),
        (set_masked, "index_put_ by a boolean mask"),
        (lambda x: x.nonzero(), "nonzero"),
        (lambda x: x.masked_select(x > 1), "masked_select"),
        (lambda x: torch.equal(x, x), "equal"),
        (lambda x: torch.unique(x), "_unique2"),
        (lambda x: torch.unique(x, dim=0), "unique_dim"),
        (lambda x: x.unique_consecutive(), "unique_consecutive"),
        (lambda x: torch.repeat_interleave(x, counts), "repeat_interleave"),
        (lambda x: x.to("meta"), "to cpu->meta"),  # the host's data to another device (there: cuda)
        (lambda x: x.sum().to("meta"), "to cpu->meta"),
        (lambda x: torch.empty(4, device="meta").copy_(x), "copy_ cpu->meta"),
    ]
    for inference in (False, True):  # (the engine runs its passes under inference mode)
        with torch.inference_mode(inference):
            t = torch.arange(4.0)
            for op, name in checks:
                assert host_syncs(op, t) == [name]
            assert host_syncs(lambda x: bool(x.sum()), t) == ["is_nonzero" if inference else "item"]
            assert host_syncs(lambda x: x.repeat_interleave(2) + x.sum(), t) == []  # sizes known on the host


def test_a_pass_that_waits_for_the_device_stays_eager(sharp, monkeypatch, caplog):
    """Were the decoding pass to read a value back (here its lengths' maximum), the start-up check keeps
    passes eager and says why; the engine serves as before."""
    from ptserve.engine import paged

    length_mask = paged._length_mask
    monkeypatch.setattr(paged, "_length_mask", lambda lens, width: length_mask(lens, max(width, int(lens.max()))))
    engine = Engine(sharp, 4096, decode_graphs=True)
    assert engine._graphs is None
    assert "decoding passes stay eager: a graph cannot hold their item" in caplog.text
    engine.start()
    try:
        [(tokens, _, finish, _)] = run(engine, [(prompts(20)[0], greedy(3))])
    finally:
        engine.shutdown()
    assert (len(tokens), finish) == (3, "length")


def ahead_engine(model, **kw) -> tuple[Engine, list[int]]:
    """An engine with async decoding (`server.async_scheduling`: on a GPU its passes are launched before the
    last one's tokens are read; here, from static buffers, the same order run eagerly) and a count of the
    passes it launched that way (and, second, of those launched while a request waited and another pass
    was in flight; third, of those with a row asking for logprobs)."""
    engine = Engine(model, 4096, decode_graphs=True, async_decode=True, **kw)
    launched = [0, 0, 0]
    ahead = engine._run_ahead

    def counting(plan):
        launched[0] += 1
        launched[1] += bool(engine._held or engine._preempted) and engine._inflight is not None
        launched[2] += any(row.stream.params.logprobs is not None for row, _ in plan)
        return ahead(plan)

    engine._run_ahead = counting
    return engine, launched


def handed_out(engine: Engine) -> tuple[dict[tuple, object], dict[tuple, list]]:
    """The rows `engine` hands tokens to from now on, and every TokenLogprob it hands out, by prompt."""
    rows: dict[tuple, object] = {}
    logprobs: dict[tuple, list] = {}
    emit = engine._emit

    def recording(row, token, logprob=None):
        rows[tuple(row.stream.prompt_ids)] = row
        if logprob is not None:
            logprobs.setdefault(tuple(row.stream.prompt_ids), []).append(logprob)
        emit(row, token, logprob)

    engine._emit = recording
    return rows, logprobs


def assert_counted_once(rows) -> None:
    """Each penalized row's counts hold each of its generated tokens once (counted on the device when drawn
    ahead, on the host when read)."""
    for row in rows:
        if row.state.counts is not None:
            generated = torch.tensor(row.tokens[len(row.stream.prompt_ids) :])
            assert torch.equal(row.state.counts, torch.bincount(generated, minlength=len(row.state.counts)).float())


def first_new(tokens: list[int], at: int) -> int:
    """The first token from index `at` on that does not occur before it (a stop id that stops exactly there)."""
    return next(t for i, t in enumerate(tokens) if i >= at and t not in tokens[:i])


def test_async_decoding_answers_as_passes_read_one_by_one(sharp):
    """Decoding passes launched before the previous pass's tokens are read give every request the tokens
    and finish of passes read one by one, while requests arrive mid-generation (a prefill pass reads first)
    and leave by length or a stop id (the pass launched ahead computed one token more for it, dropped),
    rows sample greedily and seeded (top_k, top_p, min_p) side by side, penalized rows count their tokens
    on the device, logprobs (top ones too) come back with the tokens, and rows whose stop id is banned
    until min_tokens run beside them (one stops on the first token allowed: the ban counts the tokens in
    flight); every block comes back."""
    ids = prompts(20, 27, 35, 18, 41, 30, 25, 22)
    stepwise = Engine(sharp, 4096, decode_graphs=True)
    handed = {False: handed_out(stepwise)[1]}
    stepwise.start()
    try:
        [(plain, _, _, _), (early, _, _, _)] = run(stepwise, [(ids[4], greedy(30)), (ids[5], greedy(20))])
        k = next(i for i in range(4, 20) if early[i] not in early[:i])
        jobs = [
            (ids[0], greedy(24)),
            (ids[1], greedy(12, logprobs=3)),
            (ids[2], SamplingParams(30, temperature=0.9, top_k=40, top_p=0.9, seed=3)),
            (ids[3], SamplingParams(20, temperature=1.0, min_p=0.05, seed=5)),
            (ids[4], greedy(30, stop_token_ids=(first_new(plain, 6),))),  # stops at its 7th token
            (ids[5], greedy(20, min_tokens=4, stop_token_ids=(first_new(early, 1),))),  # banned until 4
            (ids[6], greedy(30, frequency_penalty=1.5, presence_penalty=0.5)),  # counts kept on the device
            (ids[7], SamplingParams(30, temperature=0.8, repetition_penalty=1.5, seed=9, logprobs=1)),
            (ids[5], greedy(20, min_tokens=k, stop_token_ids=(early[k],))),  # allowed at k (tokens in flight count)
        ]
        want = [r[:3] for r in run(stepwise, jobs, stagger=0.03)]
    finally:
        stepwise.shutdown()
    engine, launched = ahead_engine(sharp)
    assert engine.decode_mode == "from static buffers, launched a pass ahead"
    late, emit = [], engine._emit

    def emitting(row, token, logprob=None):
        if row.finish is not None:
            late.append(token)  # a token handed out after its row finished
        emit(row, token, logprob)

    engine._emit = emitting
    rows, handed[True] = handed_out(engine)
    engine.start()
    try:
        got = [r[:3] for r in run(engine, jobs, stagger=0.03)]
        settle(engine)
    finally:
        engine.shutdown()
    assert [(t, f) for t, _, f in got] == [(t, f) for t, _, f in want]
    assert [len(t) for t, _, _ in got] == [24, 12, 30, 20, 7, len(want[5][0]), 30, 30, k + 1]
    assert late == []
    assert_counted_once(rows.values())
    assert sum(row.state.counts is not None for row in rows.values()) == 2
    assert got[1][1] == pytest.approx(want[1][1], abs=ATOL) and got[7][1] == pytest.approx(want[7][1], abs=ATOL)
    for prompt in (ids[1], ids[7]):
        ahead, stepped = handed[True][tuple(prompt)], handed[False][tuple(prompt)]
        assert [[t for t, _ in lp.top] for lp in ahead] == [[t for t, _ in lp.top] for lp in stepped]
        assert [v for lp in ahead for _, v in lp.top] == pytest.approx([v for lp in stepped for _, v in lp.top])
    assert len(handed[True][tuple(ids[1])]) == 12 and len(handed[True][tuple(ids[1])][0].top) == 3
    assert launched[0] > 10 and launched[2] > 5  # (how many depends on when the others arrive and leave)
    assert (engine._inflight, engine.running, engine.blocks.used) == (None, 0, 0)


def test_async_decoding_answers_as_passes_read_one_by_one_for_random_mixes(sharp):
    """16 requests of random lengths and settings (greedy, seeded top-k / top-p / min-p, penalties, logprobs,
    min_tokens, logit_bias), a few at a time (max_seqs 3: the rest wait) in a pool small enough to preempt:
    passes launched ahead give each the tokens, finish and logprobs of passes read one by one."""
    gen = torch.Generator().manual_seed(11)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    jobs = []
    for k, n in enumerate(torch.randint(8, 70, (16,), generator=gen).tolist()):
        settings = dict(temperature=pick(0.0, 0.7, 1.0), seed=k)
        settings.update(pick({}, {"top_k": 20}, {"top_p": 0.8}, {"min_p": 0.1}))
        settings.update(pick({}, {"frequency_penalty": 1.0}, {"presence_penalty": 0.5, "repetition_penalty": 1.3}))
        settings.update(pick({}, {"logprobs": 0}, {"logprobs": 2}, {"min_tokens": 3, "stop_token_ids": (7,)}))
        settings.update(pick({}, {"logit_bias": ((500, 5.0),)}))
        jobs.append((prompts(n, seed=k)[0], SamplingParams(int(torch.randint(4, 30, (1,), generator=gen)), **settings)))
    answers = {}
    limits = dict(max_seqs=3, kv_budget_bytes=12 * Engine(sharp, 64, kv_budget_bytes=1 << 20).bytes_per_block)
    for ahead in (False, True):
        engine, launched = ahead_engine(sharp, **limits) if ahead else (Engine(sharp, 4096, **limits), None)
        engine.start()
        try:
            answers[ahead] = [r[:3] for r in run(engine, jobs, stagger=0.01)]
            settle(engine)
        finally:
            engine.shutdown()
        assert engine.blocks.used == 0
    assert engine.preemptions > 0 and launched[0] > 20 and launched[1] > 0 and launched[2] > 0
    assert [(t, f) for t, _, f in answers[True]] == [(t, f) for t, _, f in answers[False]]
    for (_, logprobs, _), (_, stepped, _) in zip(answers[True], answers[False], strict=True):
        assert logprobs == pytest.approx(stepped, abs=ATOL)


def test_async_decoding_caches_the_block_its_last_read_token_completes(sharp):
    """A block completed by a token still in flight when its pass was planned is offered to the prefix
    cache once the token is read: turn 2 of a conversation finds the same cached blocks as without async
    decoding (57 prompt tokens and 7 computed answer tokens: 4 full blocks, the last completed by an
    answer token)."""
    first, more = prompts(57, 30)
    outputs = {}
    for ahead in (False, True):
        engine = Engine(sharp, 4096, decode_graphs=True, async_decode=ahead).start()
        try:
            [(answer, _, _, _)] = run(engine, [(first, greedy(8))])
            [(tokens, _, _, s2)] = run(engine, [(first + answer + more, greedy(8))])
        finally:
            engine.shutdown()
        outputs[ahead] = (answer, tokens, s2.cached_tokens)
    assert outputs[True] == outputs[False] and outputs[True][2] == 64


def test_async_decoding_cancels_and_preempts_as_passes_read_one_by_one(sharp):
    """A request cancelled mid-generation leaves at once, its blocks freed while the pass launched ahead
    for it is dropped; a pool too small for every row to grow lands the pass in flight before preempting
    (a preempted row is recomputed from tokens all read), and passes go on ahead while a request waits
    for blocks that are not yet free: outputs equal each request alone."""
    engine, _ = ahead_engine(sharp, prefix_caching=False)
    tokens, finish = cancel_one_of_two(engine)
    assert (len(tokens), finish) == (3, "length")
    assert (engine._inflight, engine.running, engine.blocks.used) == (None, 0, 0)

    ids = prompts(20, 24, 28, 33)
    jobs = [  # penalized rows and logprobs too (their counts kept across the recomputation)
        (ids[0], greedy(40, frequency_penalty=1.5, presence_penalty=0.5, logprobs=2)),
        (ids[1], greedy(40, repetition_penalty=1.5, min_tokens=5, stop_token_ids=(5,))),
        (ids[2], SamplingParams(40, temperature=1.0, seed=7, frequency_penalty=1.0, logprobs=0)),
        (ids[3], SamplingParams(40, temperature=1.0, seed=8)),
    ]
    alone = Engine(sharp, 4096).start()
    try:
        want = [run(alone, [job])[0][:3] for job in jobs]
    finally:
        alone.shutdown()
    engine, launched = ahead_engine(sharp, kv_budget_bytes=13 * alone.bytes_per_block, prefix_caching=False)
    rows, _ = handed_out(engine)
    engine.start()
    try:
        got = [r[:3] for r in run(engine, jobs)]
        settle(engine)
    finally:
        engine.shutdown()
    assert engine.preemptions > 0 and launched[0] > 0 and launched[1] > 0
    assert [(t, f) for t, _, f in got] == [(t, f) for t, _, f in want]
    for (_, logprobs, _), (_, alone_logprobs, _) in zip(got, want, strict=True):
        assert logprobs == pytest.approx(alone_logprobs, abs=ATOL)
    assert_counted_once(rows.values())
    assert (engine._inflight, engine.blocks.used) == (None, 0)


def test_passes_are_read_one_by_one_where_drawing_tokens_waits_for_the_device(sharp, monkeypatch, caplog):
    """Were drawing tokens to read a value back (here the sampled rows' draw), the start-up check keeps
    passes read one by one, saying why; the engine serves as before."""
    from ptserve.engine import sampling

    draw = sampling.draw
    monkeypatch.setattr(sampling, "draw", lambda probs, uniforms: draw(probs, uniforms) + int(uniforms.sum() > 2))
    engine, launched = ahead_engine(sharp)
    assert engine.decode_mode == "from static buffers"
    assert "passes are read one by one: drawing their tokens waits for the device (item)" in caplog.text
    engine.start()
    try:
        [(tokens, _, finish, _)] = run(engine, [(prompts(20)[0], greedy(5))])
    finally:
        engine.shutdown()
    assert (len(tokens), finish, launched[0]) == (5, "length", 0)


def test_a_failure_handing_out_tokens_read_ahead_fails_those_rows_only(sharp):
    """Reading and handing out a pass's tokens fails (as a bad row could): that pass's rows fail with
    "error", their blocks come back, and the engine serves the next request."""
    engine, launched = ahead_engine(sharp, prefix_caching=False)
    calls, hand_out = [0], engine._hand_out

    def failing(flight):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("bad row")
        hand_out(flight)

    engine._hand_out = failing
    engine.start()
    try:
        [(tokens, _, finish, stream)] = run(engine, [(prompts(30)[0], greedy(20))])
        settle(engine)
        assert (finish, stream.error, engine.blocks.used) == ("error", "RuntimeError: bad row", 0)
        [(tokens, _, finish, _)] = run(engine, [(prompts(31)[0], greedy(12))])
    finally:
        engine.shutdown()
    assert (len(tokens), finish, engine.dead) == (12, "length", None) and launched[0] > 10


@pytest.fixture
def triton_interpreter():
    """Triton's interpreter on the CPU (float32: it has no bf16) for the kernel CUDA runs compiled (conftest.py
    turns it on). Triton comes with torch's CUDA builds, not with the CPU one CI installs: skipped there, run
    where it is installed."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU machine: tests/test_gpu.py runs the kernel compiled")


def test_triton_rotation_equals_transformers(triton_interpreter, monkeypatch):
    """The rotation in one Triton kernel (CUDA, where its start-up check agrees) gives transformers' Phi-3
    rotation for queries and keys split from one projection as transformers makes them: grouped heads,
    head size 96 (a padded power of two inside); `rotate` uses it once the check passed, and its torch
    operations for inputs laid out otherwise."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    from ptserve.engine import rope

    monkeypatch.setattr(rope, "_triton_on", False)
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, dim, tokens in ((4, 4, 96, 3), (8, 2, 64, 5)):
        qkv = torch.randn(1, tokens, (heads + 2 * kv_heads) * dim, generator=gen)
        q = qkv[..., : heads * dim].view(1, tokens, heads, dim).transpose(1, 2)
        k = qkv[..., heads * dim : (heads + kv_heads) * dim].view(1, tokens, kv_heads, dim).transpose(1, 2)
        cos, sin = (f(torch.randn(1, tokens, dim, generator=gen)) for f in (torch.cos, torch.sin))
        want = apply_rotary_pos_emb(q, k, cos, sin)
        for got, expected in zip(rope.rotate_triton(q, k, cos, sin), want, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert rope.triton_works("cpu", torch.float32, heads, kv_heads, dim) and rope._triton_on
        for got, expected in zip(rope.rotate(q, k, cos, sin), want, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        apart = q.contiguous(), k.contiguous()  # not one projection's views: the torch operations
        assert not rope._one_tensor(*apart, cos, sin)
        for got, expected in zip(rope.rotate(*apart, cos, sin), want, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(rope, "_triton_on", False)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 96), (4, 2, 64)])
def test_triton_decode_kernel_reads_each_rows_own_blocks(triton_interpreter, monkeypatch, heads, kv_heads, dim):
    """The Triton kernel for CUDA's decoding rows without the varlen kernel gives SDPA over each row's
    gathered tokens: rows of 1 to 300 tokens, blocks out of order, one program a row and head or the rows
    split across many (merged by log-sum-exp), grouped heads, head size 96 as Phi-3.5's (a padded power of
    two inside); its start-up check agrees."""
    from ptserve.engine import triton_decode

    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(64, BS, kv_heads, dim, generator=gen) for _ in "kv")
    lens = [1, 17, 300, 40]
    tables = torch.stack([torch.randperm(63, generator=gen)[:20] + 1 for _ in lens])
    q = torch.randn(len(lens), heads, dim, generator=gen)
    want = triton_decode.reference(q, keys, values, tables, lens, dim**-0.5)
    for target, least, split in ((1, 4, (1, 20)), (1024, 4, (5, 4)), (1024, 1, (20, 1)), (1024, 3, (7, 3))):
        monkeypatch.setattr(triton_decode, "TARGET_PROGRAMS", target)
        monkeypatch.setattr(triton_decode, "MIN_SPLIT_BLOCKS", least)
        assert triton_decode.splits(len(lens), heads, 20) == split  # (splits, blocks each; the last has less)
        got = triton_decode.decode(q, keys, values, tables, torch.tensor(lens), dim**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert triton_decode.works("cpu", torch.float32, BS, kv_heads, heads, dim)


def test_passes_with_the_triton_kernel_equal_the_gathered_ones(triton_interpreter, sharp):
    """Through the model: a decoding pass, and a pass where decoding rows ride beside a prompt chunk, give
    the same hidden states with the kernel reading the pool in place as with the blocks gathered."""
    from ptserve.engine.paged import PagedBatch

    engine = Engine(sharp, 4096)
    gen = torch.Generator().manual_seed(1)
    for t in engine.pool.keys + engine.pool.values:
        t.normal_(generator=gen)  # any finite keys and values
    a, b, c = (engine.blocks.allocate(n) for n in (2, 3, 1))
    decoding = [(20, 1, a), (33, 1, b)]
    passes = [(decoding, [7, 8], [20, 33]), ([(0, 5, c), *decoding], [1, 2, 3, 4, 5, 7, 8], [0, 1, 2, 3, 4, 20, 33])]
    for rows, ids, positions in passes:
        hidden = []
        for in_place in (False, True):
            engine.pool.triton_decode = in_place
            batch = PagedBatch.build(engine.pool, rows, False)
            with torch.inference_mode():
                hidden.append(engine._hidden(batch, torch.tensor([ids]), torch.tensor([positions]))[0])
        torch.testing.assert_close(hidden[1], hidden[0], atol=1e-4, rtol=1e-4)


def test_in_place_reading_needs_as_many_key_heads_as_threads(monkeypatch):
    """A row read alone gives the CPU kernel one work item per key head: with more threads than that (a
    many-core host, grouped-query heads) decoding rows stay grouped."""
    from ptserve.engine import paged
    from ptserve.engine.paged import KVPool, PagedBatch

    pool = KVPool(1, 16, BS, 2, 8, torch.float32, "cpu")
    monkeypatch.setattr(paged, "MIN_RUN_BYTES", 0)
    monkeypatch.setattr(paged, "MIN_ROW_BYTES", 0)
    rows = [(40, 1, [3, 4, 5])]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert PagedBatch.build(pool, rows, use_varlen=False).alone is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert PagedBatch.build(pool, rows, use_varlen=False).alone is None


def test_an_idle_engine_gives_memory_back_only_after_a_quiet_while(sharp, monkeypatch):
    """Freed host memory goes back (malloc_trim) once nothing has arrived for IDLE_RELEASE_S, not as soon
    as the engine idles: a request soon after finds its memory still there."""
    import time

    from ptserve.engine import scheduler

    released = []

    def release():  # the real one, timed
        released.append(time.monotonic())
        scheduler_release()

    scheduler_release = scheduler.release_host_memory
    monkeypatch.setattr(scheduler, "release_host_memory", release)
    monkeypatch.setattr(scheduler, "IDLE_RELEASE_S", 0.5)
    engine = Engine(sharp, 4096).start()
    try:
        for ids in prompts(20, 30):  # back to back: idle well under the quiet while in between
            run(engine, [(ids, greedy(3))])
            done = time.monotonic()
            time.sleep(0.1)
            assert released == []
        time.sleep(1.0)
        assert len(released) == 1 and released[0] - done > 0.4  # once, after the quiet while
        time.sleep(0.7)
        assert len(released) == 1  # nothing used since: not again
        run(engine, [(prompts(10)[0], greedy(2))])
        time.sleep(1.0)
        assert len(released) == 2
    finally:
        engine.shutdown()


def test_the_worker_hands_its_engine_the_server_settings(tiny_model_dir):
    """server.prefill_chunk_tokens, max_concurrent_sequences, prefix_caching and kv_cache_gb, from the
    environment as a user sets them, are what the worker's engine runs with."""
    from ptserve.config import load_config
    from ptserve.worker import Worker

    environ = {
        "PTSERVE_SERVER_PREFILL_CHUNK_TOKENS": "64",
        "PTSERVE_SERVER_MAX_CONCURRENT_SEQUENCES": "3",
        "PTSERVE_SERVER_PREFIX_CACHING": "false",
        "PTSERVE_SERVER_KV_CACHE_GB": "0.01",
    }
    config = load_config(None, environ=environ, overrides={("model", "id"): str(tiny_model_dir)})
    worker = Worker(config, None, None)
    try:
        engine = worker.engine
        assert (engine.prefill_chunk, engine.max_seqs, engine.blocks.prefix_caching) == (64, 3, False)
        assert engine.pool.nbytes <= 10**7 < engine.pool.nbytes + engine.bytes_per_block
    finally:
        worker.engine.shutdown()


def test_prompt_chunks_by_device_unless_configured(monkeypatch, tiny_model_dir):
    """server.prefill_chunk_tokens null: 512 on the CPU; on a GPU vLLM's API-server defaults, 8192 with
    70 GiB or more (an A100 excepted) where chunks attend without a mask (the varlen kernel, or two
    FlashAttention calls, as the engine found at start), else 2048; a configured value wins."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from ptserve.engine import scheduler

    cuda = torch.device("cuda")
    cards = {"H100": (80 * 2**30, 8192), "A100": (80 * 2**30, 2048), "L4": (22 * 2**30, 2048)}
    for unmasked in (True, False):
        for name, (memory, want) in cards.items():
            props = SimpleNamespace(name=f"NVIDIA {name}", total_memory=memory)
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
            assert scheduler.default_prefill_chunk(cuda, unmasked) == (want if unmasked else 2048), name
    assert scheduler.default_prefill_chunk(torch.device("cpu"), True) == 512
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert Engine(model, 4096, kv_budget_bytes=1 << 24).prefill_chunk == 512
    assert Engine(model, 4096, kv_budget_bytes=1 << 24, prefill_chunk=1024).prefill_chunk == 1024
