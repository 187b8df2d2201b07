"""Seeds derived from labels: the same on every run, platform and DataLoader worker."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed from ``seed`` and any labels (split, epoch, index, purpose): a hash of their
    text, so one item's generators never depend on other items, the run or the platform."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
