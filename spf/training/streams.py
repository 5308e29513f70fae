"""The deterministic, resumable data order every method trains on: epoch permutations seeded by the run
seed, a stream of global batches that starts at any sample position (a resumed run continues the order)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["DataStream", "index_batches"]


def index_batches(n: int, batch_size: int, seed: int, start: int) -> Iterator[tuple[list[int], int]]:
    """Deterministic index stream: epoch e is a permutation seeded by (seed, e); resumable from `start`."""
    pos = start
    perm: list[int] = []
    perm_epoch = -1
    while True:
        batch = []
        for _ in range(batch_size):
            epoch, i = divmod(pos, n)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=gen).tolist()
                perm_epoch = epoch
            batch.append(perm[i])
            pos += 1
        yield batch, pos


class DataStream:
    """Global batches of encoded rows from :func:`index_batches`, starting at sample position ``start``."""

    def __init__(self, rows: Sequence[Any], global_batch: int, seed: int, start: int) -> None:
        self.rows = rows
        self._indices = index_batches(len(rows), global_batch, seed, start)

    def next(self) -> list[Any]:
        idx, _pos = next(self._indices)
        return [self.rows[i] for i in idx]
