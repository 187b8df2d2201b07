"""The order in which training examples are read, and the position in it.

The examples form one endless stream: epoch 0's permutation, then epoch 1's, ... Each epoch's
permutation comes from a generator seeded by (seed, epoch) alone, so the stream is the same for
any number of processes, any batch size and any interruption. A micro-step takes the next
``batch_size * world_size`` examples (a *global* batch, which may straddle two epochs rather than
drop the tail of one) and process ``rank`` keeps every ``world_size``-th of them starting at
``rank``. Two processes with batch B therefore see exactly the examples of one process with batch
2B. The position is ``(epoch, offset)``: how far the stream has been read; it goes into every
checkpoint, so a resumed run continues with exactly the next batch.

With aspect-ratio buckets (`item_buckets` on the data set) every global batch holds items of one
bucket: `BucketBatches` groups each epoch's permutation by bucket, fills a bucket's last batch up
with its own first items again, and shuffles the batches. The position then counts the examples
of that padded epoch (`epoch_size`).
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

    @property
    def epoch_size(self) -> int:
        """Examples per epoch: what `Position.advance` wraps at."""
        return self.size

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


class BucketBatches(RankBatches):
    """`RankBatches` whose global batches each hold items of one aspect-ratio bucket:
    ``buckets[i]`` is item i's bucket. Same stream for any number of processes with the same
    global batch; a position is resumed at the batch it falls in."""

    def __init__(
        self,
        buckets: list[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: Position = Position(),
    ):
        super().__init__(len(buckets), batch_size, seed, rank, world_size, start)
        self.buckets = buckets
        want = batch_size * world_size
        counts: dict[int, int] = {}
        for bucket in buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        self._epoch_size = sum(-(-n // want) * want for n in counts.values())

    @property
    def epoch_size(self) -> int:
        return self._epoch_size

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Epoch ``epoch``'s global batches, in training order."""
        want = self.batch_size * self.world_size
        by_bucket: dict[int, list[int]] = {}
        for i in permutation(self.size, self.seed, epoch):
            by_bucket.setdefault(self.buckets[i], []).append(i)
        batches = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            items = items + (items * -(-want // len(items)))[: -len(items) % want]  # fill the last batch
            batches += [items[k : k + want] for k in range(0, len(items), want)]
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, "buckets", epoch))
        return [[(epoch, i) for i in batches[k]] for k in torch.randperm(len(batches), generator=shuffle).tolist()]

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = self.start.epoch, self.start.offset // (self.batch_size * self.world_size)
        while True:
            yield from self.epoch_batches(epoch)[first:]
            epoch, first = epoch + 1, 0


def batch_order(dataset: Any, batch_size: int, seed: int, rank: int, world_size: int, start: Position) -> RankBatches:
    """The batch sampler for `dataset`: `BucketBatches` when its items have aspect-ratio buckets."""
    buckets = buckets_of(dataset)
    if buckets is None:
        return RankBatches(len(dataset), batch_size, seed, rank, world_size, start)
    return BucketBatches(buckets, batch_size, seed, rank, world_size, start)


def buckets_of(dataset: Any) -> list[int] | None:
    """Each item's bucket, through wrappers (`.dataset`) and subsets (`.indices`); None without buckets."""
    if getattr(dataset, "item_buckets", None) is not None:
        return list(dataset.item_buckets)
    if hasattr(dataset, "dataset"):
        inner = buckets_of(dataset.dataset)
        if inner is not None and hasattr(dataset, "indices"):
            return [inner[i] for i in dataset.indices]
        return inner
    return None


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
