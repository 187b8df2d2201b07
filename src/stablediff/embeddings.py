"""Textual-inversion embeddings: read the files people share, check them against the model, and find
their names in prompts.

An embedding is 1 to 75 learned vectors as wide as the text encoder's token embeddings (768 for
SD 1.x, 1024 for SD 2.x). Where its name stands in a prompt, the encoder reads those vectors in
place of token embeddings. An SDXL embedding has two sets of as many vectors, one per text encoder:
``clip_l`` (768 wide, CLIP ViT-L) and ``clip_g`` (1280 wide, OpenCLIP bigG), read by each encoder
at the same positions. Files are told apart by what they hold; the file name only gives the
default name (A1111 names an embedding after its file):

* A1111 ``.pt`` (a pickle): ``string_to_param`` ``{"*": [n, dim]}``, with ``name``, ``step``,
  ``sd_checkpoint``...; default token: the file's stem;
* A1111 / kohya ``.safetensors``: ``emb_params`` ``[n, dim]``; default token: the file's stem;
* diffusers ``learned_embeds.safetensors`` / ``.bin``: one entry ``{token: [dim] or [n, dim]}``;
  default token: the stored one;
* SDXL ``.safetensors`` (as the web UIs and kohya write them): ``clip_l`` ``[n, 768]`` and ``clip_g``
  ``[n, 1280]``; default token: the file's stem. They load on SDXL base models only (the refiner,
  whose one text encoder is bigG, does not take embeddings yet).

Pickles are read only through the restricted unpickler of :mod:`stablediff.weights.unpickle`, so an
old embedding saved as an ``nn.ParameterDict`` (the original textual-inversion code) is refused.

**How a name is found, and why this way.** diffusers adds the name (and ``name_1``, ``name_2``...
for more vectors) to the tokenizer and grows the encoder's embedding table; that changes the model,
and unloading has to undo it. A1111 instead finds the name in the prompt and, when the chunk is
encoded, puts the vectors in place of the token embeddings at its positions. We do as A1111: the
encoder's weights are never written, so unloading is exact by construction, and a multi-vector
embedding is placed as a whole, never cut by a 75-token chunk boundary (``tokenize_prompt``).

A1111 matches the name's BPE ids inside each emphasis piece. We match the name's *text* in each
piece, case-insensitively (the tokenizer lower-cases), any whitespace run matching a space, as a
whole word: a name that begins (ends) with a letter or digit does not match after (before) another
letter or digit, so ``mytok`` is not found in ``mytoks``. The text around a match is tokenized
as before. Text matching also finds ``<cat-toy>`` in ``a <cat-toy>, red``, where BPE ids do not
(``>,`` is one word to BPE, so its ``>`` has another id), and gives the same tokens as diffusers'
added tokens whenever the name stands as a word; diffusers also matches inside words
(``xxmytokyy``), which we do not.

A name must not be an ordinary word or phrase of the vocabulary (every word of it one BPE token,
like ``cat`` or ``bad hands``): it would silently change every prompt that uses those words.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import torch

from stablediff.errors import BadFileError, printable
from stablediff.weights.io import CheckpointError, detect_format, read_state_dict, write_safetensors
from stablediff.weights.unpickle import RefusedCheckpoint, load_legacy_pickle, load_torch_zip

__all__ = [
    "Embedding",
    "EmbeddingTable",
    "MAX_VECTORS",
    "check_token",
    "check_width",
    "embed_tokens",
    "read_embedding",
    "save_embedding",
]

MAX_VECTORS = 75  # one chunk's tokens: a multi-vector embedding must fit in one chunk
# Real embedding files are a few KB (75 vectors of 1024 floats is 300 KB); anything far larger is
# a LoRA or a checkpoint given by mistake, and is refused before it is read.
MAX_FILE_BYTES = 32 << 20
MAX_TOKEN_CHARS = 100
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's vectors for its first and second text encoder
_SYNTAX = "()[]\\"  # what the prompt grammar reads as emphasis or escape: a name with them never matches


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True, eq=False)  # eq=False: equal only to itself (chunks compare their embeddings)
class Embedding:
    """One loaded embedding: ``vectors`` [n, dim] float32 on the CPU, the ``token`` that calls it,
    the file it came from, its ``format`` ("a1111", "diffusers" or "sdxl") and the training
    ``step`` when the file records it. An SDXL embedding's ``vectors`` are its ``clip_l`` ones, and
    ``vectors_2`` [n, dim_2] its ``clip_g`` ones, for SDXL's second text encoder (else None)."""

    token: str
    vectors: torch.Tensor
    path: str
    format: str
    step: int | None = None
    vectors_2: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


# ---------------------------------------------------------------------------------------------
# Reading
def read_embedding(path: str | os.PathLike[str], token: str | None = None) -> Embedding:
    """Read an embedding file of any format above. The token: ``token`` if given, else the one a
    diffusers file stores, else the file's stem. Checks the vectors' shape, count and values
    (not the model: see ``check_width``); BadFileError naming the file otherwise."""
    path = os.fspath(path)
    fmt = detect_format(path)  # also refuses missing, empty and unknown files
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise BadFileError(
            f"{path}: {size} bytes is too large for a textual-inversion embedding (at most {MAX_FILE_BYTES}; "
            "real ones are a few KB): is it a LoRA or a model checkpoint?"
        )
    data = _read_object(path, fmt)
    if isinstance(data, dict) and any(k in data for k in SDXL_KEYS):
        vectors, vectors_2 = _sdxl_vectors(data, path)
        return Embedding(token if token is not None else Path(path).stem, vectors, path, "sdxl", None, vectors_2)
    stored, vectors, kind, step = _find_vectors(data, path)
    name = token if token is not None else stored if stored is not None else Path(path).stem
    return Embedding(name, _check_vectors(vectors, path), path, kind, step)


def _sdxl_vectors(data: dict, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_l, clip_g) vectors of an SDXL embedding, checked: both there, as many of each."""
    missing = [k for k in SDXL_KEYS if k not in data]
    if missing:
        raise BadFileError(
            f"{path}: an SDXL embedding needs both clip_l and clip_g vectors (one set per text encoder); "
            f"{missing[0]} is missing"
        )
    others = sorted(printable(str(k))[:40] for k in data if k not in SDXL_KEYS)
    if others:
        raise BadFileError(f"{path}: an SDXL embedding holds clip_l and clip_g only; the file also has {others[:8]}")
    first, second = (_check_vectors(data[k], f"{path} ({k})") for k in SDXL_KEYS)
    if len(first) != len(second):
        raise BadFileError(
            f"{path}: clip_l has {len(first)} vectors and clip_g {len(second)}; an SDXL embedding has as many of each"
        )
    return first, second


def _read_object(path: str, fmt: str) -> object:
    """The file's top-level object: a safetensors file's tensors, or an unpickled object."""
    if fmt == "safetensors":
        return read_state_dict(path)
    try:
        return load_torch_zip(path) if fmt == "torch-zip" else load_legacy_pickle(path)
    except RefusedCheckpoint as exc:
        hint = ""
        if "ParameterDict" in str(exc):
            hint = " (an embedding saved as an nn.ParameterDict by old training code; re-save it as .safetensors)"
        raise CheckpointError(f"{path}: {exc}{hint}") from None
    except Exception as exc:  # pickle/zip/struct errors: the file is damaged
        raise CheckpointError(f"{path}: corrupt {fmt} file: {type(exc).__name__}: {exc}") from exc


def _find_vectors(data: object, path: str) -> tuple[str | None, object, str, int | None]:
    """(stored token or None, the vectors object, format, step) from a file's top-level object."""
    if not isinstance(data, dict):
        raise BadFileError(f"{path}: holds a {type(data).__name__}, not a textual-inversion embedding (a dict)")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            got = f"{len(params)} entries" if isinstance(params, dict) else f"a {type(params).__name__}"
            raise BadFileError(f"{path}: string_to_param must hold exactly one entry ({{'*': tensor}}); it has {got}")
        step = data.get("step")
        return None, next(iter(params.values())), "a1111", step if type(step) is int else None
    if "emb_params" in data:  # A1111 / kohya .safetensors
        return None, data["emb_params"], "a1111", None
    if len(data) == 1:  # diffusers: {token: vectors}
        ((key, value),) = data.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            return key, value, "diffusers", None
    keys = [printable(str(k))[:40] for k in list(data)[:8]]
    raise BadFileError(
        f"{path}: no textual-inversion embedding found: expected string_to_param (A1111 .pt), emb_params "
        f"(A1111 .safetensors) or one {{token: tensor}} entry (diffusers); the file has {len(data)} keys {keys}"
    )


def _check_vectors(value: object, path: str) -> torch.Tensor:
    """[n, dim] float32 (a [dim] vector is one row), 1 <= n <= MAX_VECTORS, finite; a fresh copy."""
    if not isinstance(value, torch.Tensor):
        raise BadFileError(f"{path}: the embedding is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise BadFileError(f"{path}: the embedding's vectors are {value.dtype}; they must be floating point")
    vectors = value[None] if value.ndim == 1 else value
    if vectors.ndim != 2:
        raise BadFileError(f"{path}: the embedding has shape {list(value.shape)}; expected [n_vectors, dim] or [dim]")
    n = vectors.shape[0]
    if not 1 <= n <= MAX_VECTORS:
        raise BadFileError(
            f"{path}: the embedding has {n} vectors; it may have 1 to {MAX_VECTORS} (one 75-token chunk holds them all)"
        )
    if vectors.shape[1] == 0:
        raise BadFileError(f"{path}: the embedding's vectors are empty (shape {list(value.shape)})")
    vectors = vectors.detach().to(torch.float32, copy=True).contiguous()  # copy: nothing mmapped survives
    if not torch.isfinite(vectors).all():
        raise BadFileError(f"{path}: the embedding's vectors hold NaN or infinite values")
    return vectors


# ---------------------------------------------------------------------------------------------
# Writing
def save_embedding(
    path: str | os.PathLike[str],
    vectors: torch.Tensor,
    token: str,
    step: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``vectors`` [n, dim] as an A1111 / kohya ``.safetensors`` embedding (``emb_params``),
    which A1111, ``read_embedding`` and diffusers' ``load_textual_inversion`` all read; the token
    and step go into the metadata (A1111 names an embedding after its file). Written atomically."""
    vectors = _check_vectors(vectors, os.fspath(path))
    meta = {"name": token, **({"step": str(step)} if step is not None else {}), **(metadata or {})}
    write_safetensors({"emb_params": vectors}, path, meta)


# ---------------------------------------------------------------------------------------------
# Checks against the model
def _family(width: int) -> str:
    return FAMILIES.get(width, "no SD family")


def check_width(embedding: Embedding, width: int, width_2: int | None = None) -> None:
    """BadFileError unless the vectors are as wide as the model's token embeddings: ``width``, and
    for SDXL base ``width_2``, the second text encoder's (then the embedding must be an SDXL one)."""
    if width_2 is not None:
        _check_sdxl_width(embedding, width, width_2)
        return
    if embedding.vectors_2 is not None:
        raise BadFileError(
            f"{embedding.path}: an SDXL embedding (clip_l {embedding.dim} wide and clip_g "
            f"{embedding.vectors_2.shape[1]} wide, for SDXL's two text encoders), but this model has one text "
            f"encoder, {width} wide ({_family(width)}): an SDXL embedding works with SDXL models only"
        )
    if embedding.dim != width:
        raise BadFileError(
            f"{embedding.path}: the embedding's vectors are {embedding.dim} wide ({_family(embedding.dim)}), "
            f"but this model's text encoder takes {width}-wide token embeddings ({_family(width)}); "
            "an embedding works only with the model family it was trained for"
        )


def _check_sdxl_width(embedding: Embedding, width: int, width_2: int) -> None:
    if embedding.vectors_2 is None:
        raise BadFileError(
            f"{embedding.path}: an embedding for one text encoder ({embedding.dim} wide, {_family(embedding.dim)}), "
            f"but this model is SDXL: it takes SDXL embeddings, with clip_l ({width}-wide) and clip_g "
            f"({width_2}-wide) vectors for its two text encoders"
        )
    widths = (embedding.dim, embedding.vectors_2.shape[1])
    if widths != (width, width_2):
        raise BadFileError(
            f"{embedding.path}: the embedding's clip_l / clip_g vectors are {widths[0]} / {widths[1]} wide, but this "
            f"model's text encoders take {width} / {width_2}-wide token embeddings"
        )


def check_token(token: object, tokenizer: _Tokenizer) -> str:
    """The token, if prompts can call it and it hides no ordinary word; ValueError saying why not."""
    if not isinstance(token, str):
        raise TypeError(f"an embedding token must be a str, got {type(token).__name__}")
    shown = printable(token)[:MAX_TOKEN_CHARS]
    if not token.strip() or token != token.strip():
        raise ValueError(f"embedding token {shown!r} must be non-empty, without spaces at either end")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"embedding token {shown!r}... has {len(token)} characters; at most {MAX_TOKEN_CHARS}")
    if printable(token, keep="") != token:
        raise ValueError(f"embedding token {shown!r} holds control characters")
    bad = sorted({c for c in token if c in _SYNTAX})
    if bad:
        raise ValueError(
            f"embedding token {shown!r} contains {''.join(bad)!r}, which prompts read as emphasis or escapes "
            f"(none of {_SYNTAX!r} may appear); pass another token"
        )
    words = token.split()
    lengths = [len(tokenizer.encode(w)) for w in words]
    if 0 in lengths:
        raise ValueError(f"embedding token {shown!r} gives no tokens (the tokenizer drops its text)")
    if all(n == 1 for n in lengths):
        raise ValueError(
            f"embedding token {shown!r} is an ordinary {'word' if len(words) == 1 else 'phrase'} of the vocabulary: "
            f"loading it would change every prompt that says {shown!r}; pass another token, "
            f"e.g. token='<{'-'.join(words)}>'"
        )
    return token


# ---------------------------------------------------------------------------------------------
# The loaded embeddings, and their names in prompts
class EmbeddingTable:
    """The embeddings loaded into one pipeline; ``split`` finds their names in prompt text (the
    ``PromptEmbeddings`` that ``prompts.tokenize_prompt`` takes)."""

    def __init__(self) -> None:
        self._items: dict[str, Embedding] = {}  # by _key(token)
        self._by_token: dict[str, Embedding] = {}  # by token as loaded; ``mapping`` is a live view of it
        self._pattern: re.Pattern[str] | None = None
        self._order: list[Embedding] = []  # group e{i} of the pattern is _order[i]

    def load(
        self,
        path: str | os.PathLike[str],
        token: str | None,
        *,
        tokenizer: _Tokenizer,
        width: int,
        width_2: int | None = None,
    ) -> Embedding:
        """Read, check (widths, token, not loaded yet) and add an embedding file; returns it.
        ``width_2``: SDXL's second text encoder's width (None: one text encoder)."""
        embedding = read_embedding(path, token)
        check_width(embedding, width, width_2)
        try:
            check_token(embedding.token, tokenizer)
        except ValueError as exc:
            if token is None:  # the name came from the file: say so
                raise ValueError(f"{embedding.path}: {exc} (the name comes from the file; pass token=...)") from None
            raise
        self.add(embedding)
        return embedding

    def add(self, embedding: Embedding) -> None:
        """Add a checked embedding; ValueError when one of the same name is loaded already."""
        old = self._items.get(_key(embedding.token))
        if old is not None:
            raise ValueError(
                f"an embedding named {old.token!r} is loaded already (from {old.path}); "
                f"unload_embedding({old.token!r}) first, or pass another token"
            )
        self._items[_key(embedding.token)] = embedding
        self._rebuild()

    def remove(self, token: str | None = None) -> None:
        """Remove the embedding called ``token`` (any case), or all of them when None."""
        if token is None:
            self._items.clear()
        elif self._items.pop(_key(token), None) is None:
            raise ValueError(f"no embedding named {token!r} is loaded (loaded: {sorted(self.mapping())})")
        self._rebuild()

    def mapping(self) -> Mapping[str, Embedding]:
        """token -> Embedding: a read-only view that follows later loads and unloads."""
        return MappingProxyType(self._by_token)

    def __len__(self) -> int:
        return len(self._items)

    def split(self, text: str) -> list[str | Embedding]:
        """``text`` cut where embedding names stand: text pieces and embeddings, in order. With no
        match the text comes back alone and unchanged."""
        if self._pattern is None:
            return [text]
        normal = unicodedata.normalize("NFC", text)  # the tokenizer applies NFC as well
        parts: list[str | Embedding] = []
        end = 0
        for match in self._pattern.finditer(normal):
            if match.start() > end:
                parts.append(normal[end : match.start()])
            parts.append(self._order[int(match.lastgroup[1:])])
            end = match.end()
        if not parts:
            return [text]
        if end < len(normal):
            parts.append(normal[end:])
        return parts

    def _rebuild(self) -> None:
        self._by_token.clear()
        self._by_token.update((e.token, e) for e in self._items.values())
        # Longest name first, so that "mytok-v2" wins over "mytok" where both match (A1111 tries
        # longer names first too).
        self._order = sorted(self._items.values(), key=lambda e: len(e.token), reverse=True)
        alternatives = [f"(?P<e{i}>{_name_pattern(e.token)})" for i, e in enumerate(self._order)]
        self._pattern = re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None


def _key(token: str) -> str:
    return " ".join(unicodedata.normalize("NFC", token).split()).lower()


def _name_pattern(token: str) -> str:
    """The regular expression of a name as a whole word (see the module docstring)."""
    body = r"\s+".join(re.escape(word) for word in unicodedata.normalize("NFC", token).split())
    before = r"(?<![^\W_])" if token[0].isalnum() else ""  # [^\W_]: a letter or digit
    after = r"(?![^\W_])" if token[-1].isalnum() else ""
    return before + body + after


# ---------------------------------------------------------------------------------------------
# The encoder side
def embed_tokens(
    token_embedding: torch.nn.Embedding,
    ids: torch.Tensor,
    fixes: Sequence[tuple[int, Sized]],
    second: bool = False,
) -> torch.Tensor:
    """The token embeddings of ``ids`` [B, L], with each fix's vectors (``(position, Embedding)``)
    at ``position ... position + n - 1`` of every row: ``vectors``, or with ``second`` (SDXL's
    second text encoder) ``vectors_2``. A new tensor: the table is never written."""
    rows = token_embedding(ids)
    for position, embedding in fixes:
        vectors = embedding.vectors_2 if second else embedding.vectors
        if vectors is None:
            raise ValueError(f"embedding {getattr(embedding, 'token', '?')!r} has no vectors for a second text encoder")
        if not 0 <= position <= rows.shape[1] - len(vectors):
            raise ValueError(f"{len(vectors)} vectors at position {position} overflow {rows.shape[1]} positions")
        rows[:, position : position + len(vectors)] = vectors.to(rows)  # the table's dtype, as diffusers
    return rows
