"""The LoRA hash AUTOMATIC1111 writes in ``Lora hashes: name: 0123456789ab`` of PNG parameters.

A1111 (extensions-builtin/Lora/network.py, modules/hashes.py) hashes a ``.safetensors`` LoRA with
kohya's "addnet" hash: SHA-256 of the file's bytes after the header (the 8-byte length and the
JSON), so editing the metadata does not change it; other files get the SHA-256 of all their bytes.
The short hash is the first 12 hex digits. (A1111 prefers a ``sshs_model_hash`` the file's metadata
claims, which kohya's trainer computes the same way; we always compute it.)
"""

from __future__ import annotations

import hashlib
import os

from stablediff.weights.io import detect_format

__all__ = ["addnet_hash", "lora_hash", "data_hash"]

_BLOCK = 1 << 20


def addnet_hash(path: str | os.PathLike) -> str:
    """The full SHA-256 (hex) A1111 uses for a LoRA file: of the data section for safetensors,
    of the whole file otherwise."""
    path = os.fspath(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if detect_format(path) == "safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's short LoRA hash: the first 12 hex digits of :func:`addnet_hash`."""
    return addnet_hash(path)[:12]


def data_hash(serialized: bytes) -> str:
    """:func:`addnet_hash` of a safetensors file held in memory (for ``sshs_model_hash``)."""
    start = 8 + int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(memoryview(serialized)[start:]).hexdigest()
