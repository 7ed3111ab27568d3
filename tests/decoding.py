"""Decoding passes' inputs for driving `Engine._decode_step` (and what wraps it) directly in the tests."""

from __future__ import annotations

import torch

from ptserve.engine.blocks import NULL_BLOCK


class RandomDecode:
    """Any contents: the engine's pool filled with random keys and values; rows of up to `width` blocks
    picked from 32 any row reads, each row's last block (where its new token goes) its own, so no two rows
    write one slot. (rows, width) -> ids, positions, slots, lens [B] and tables [B, W] (null-padded), on the
    host."""

    def __init__(self, engine, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.block_size = engine.block_size
        self.shared, self.own = engine.blocks.allocate(32), engine.blocks.allocate(64)
        pool_gen = torch.Generator(engine.device).manual_seed(seed)
        for t in engine.pool.keys + engine.pool.values:
            t.normal_(generator=pool_gen)

    def __call__(self, rows: int, width: int):
        bs = self.block_size
        lens = torch.randint(1, width * bs + 1, (rows,), generator=self.gen)
        tables = torch.full((rows, width), NULL_BLOCK)
        for r, n in enumerate(lens.tolist()):
            picked = torch.randperm(len(self.shared), generator=self.gen)[: -(-n // bs)]
            tables[r, : len(picked)] = torch.tensor(self.shared)[picked]
            tables[r, len(picked) - 1] = self.own[r]
        positions = lens - 1
        slots = tables.gather(1, (positions // bs).unsqueeze(1)).squeeze(1) * bs + positions % bs
        ids = torch.randint(100, 30000, (rows,), generator=self.gen)
        return ids, positions, slots, lens, tables


def step_args(ids, positions, slots, lens, tables, device="cpu") -> list[torch.Tensor]:
    """`Engine._decode_step`'s arguments: [1, B] ids and positions, [B] slots, [B, W] tables, [B] lens."""
    return [t.to(device) for t in (ids.unsqueeze(0), positions.unsqueeze(0), slots, tables, lens)]
