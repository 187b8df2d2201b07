"""The order in which training examples are read, and the position in it.

The examples form one endless stream: epoch 0's permutation, then epoch 1's, ... Each epoch's
permutation comes from a generator seeded by (seed, epoch) alone, so the stream is the same for
any number of processes, any batch size and any interruption. A micro-step takes the next
``batch_size * world_size`` examples (a *global* batch, which may straddle two epochs rather than
drop the tail of one) and process ``rank`` keeps every ``world_size``-th of them starting at
``rank``. Two processes with batch B therefore see exactly the examples of one process with batch
2B. The position is ``(epoch, offset)``: how far the stream has been read; it goes into every
checkpoint, so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stablediff.seeds import derive_seed


@dataclass(frozen=True)
class Position:
    """`offset` examples of epoch `epoch` have been consumed (0 <= offset < dataset size)."""

    epoch: int = 0
    offset: int = 0

    def advance(self, count: int, size: int) -> Position:
        total = self.epoch * size + self.offset + count
        return Position(total // size, total % size)


def permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch `epoch`: a permutation of range(size) from a generator seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return torch.randperm(size, generator=generator).tolist()


class RankBatches:
    """An endless iterable of this process's share of each global batch, from `start` on:
    lists of ``(epoch, index)`` for :class:`EpochItems`. Used as a DataLoader's batch_sampler."""

    def __init__(
        self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: Position = Position()
    ):
        if size < 1:
            raise ValueError("the training data set is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = self.start.epoch, self.start.offset
        order = permutation(self.size, self.seed, epoch)
        want = self.batch_size * self.world_size
        while True:
            batch = []
            while len(batch) < want:
                take = min(want - len(batch), self.size - offset)
                batch += [(epoch, i) for i in order[offset : offset + take]]
                offset += take
                if offset == self.size:
                    epoch, offset = epoch + 1, 0
                    order = permutation(self.size, self.seed, epoch)
            yield batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


def set_epoch(dataset: Any, epoch: int) -> None:
    """Tell `dataset` (or the data set a wrapper such as torch's Subset holds, via `.dataset`) which
    epoch is being read; a data set without `set_epoch` has no per-epoch randomness."""
    while not hasattr(dataset, "set_epoch") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if hasattr(dataset, "set_epoch") and getattr(dataset, "epoch", None) != epoch:
        dataset.set_epoch(epoch)


class EpochItems:
    """A map-style data set indexed by ``(epoch, index)``: sets the data set's epoch (its random
    crops, flips and caption dropout) before reading, so an item's randomness depends only on its
    own epoch and index, also inside DataLoader worker processes."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        set_epoch(self.dataset, epoch)
        return self.dataset[index]
