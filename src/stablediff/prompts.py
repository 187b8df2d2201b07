"""Prompt emphasis syntax and long-prompt chunking, as in the AUTOMATIC1111 web UI.

Three steps turn a prompt into text-encoder conditioning (see docs/prompts.md):

1. ``parse_prompt``: ``"a (red:1.3) [car]"`` -> ``[("a ", 1.0), ("red", 1.3), (" ", 1.0), ("car", 0.909...)]``.
2. ``tokenize_prompt``: the pieces -> ``Chunk`` s of ``tokenizer.max_length`` (77) ids and weights:
   BOS, up to 75 tokens, EOS, padding. A prompt longer than 75 tokens gets several chunks.
3. ``encode_chunks``: each chunk through the text encoder, weighted, concatenated -> ``[1, 77*n, D]``.

A plain prompt of at most 75 tokens gives exactly ``tokenizer(prompt)`` and exactly the encoder's
output, so it matches diffusers bit for bit. No model imports: the encoder is a callable.

Textual-inversion embeddings (``stablediff.embeddings``) enter through ``tokenize_prompt``'s
``embeddings``: each piece is split where an embedding's name stands, and the embedding takes one
placeholder position per vector, recorded in ``Chunk.fixes``; ``encode_chunks`` hands those to the
encoder, which reads the vectors there in place of the placeholders' token embeddings.

SDXL has two text encoders: ``encode_sdxl_prompt`` chunks the prompt for each tokenizer the same
way, concatenates the two encoders' chunk outputs along the width (``encode_sdxl_chunks``) and
takes the second encoder's pooled embedding from the first chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

ROUND = 1.1  # "(x)" multiplies attention by this
SQUARE = 1 / 1.1  # "[x]"; A1111 multiplies by 1/1.1 rather than dividing, and so do we (same bits)
BREAK = ("BREAK", -1.0)  # marker in parse_prompt's output; A1111 uses the same pair
COMMA_BACKTRACK = 20  # A1111's "comma padding backtrack" default, in tokens
PLACEHOLDER_ID = 0  # the id at an embedding vector's position (A1111 uses 0 too); the encoder never reads it

_TOKEN = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])?          # "\(" "\)" "\[" "\]" "\\" are literal; a lone "\" is dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # ":1.3)" closes a "(" and sets its weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)           # plain text; a ":" that starts no weight is text
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")  # uppercase only, as a whole word; eats its spaces


class Tokenizer(Protocol):
    """What chunking needs from a tokenizer (``stablediff.tokenizer.CLIPTokenizer`` has it)."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int

    def encode(self, text: str) -> list[int]: ...


class PromptEmbeddings(Protocol):
    """What chunking needs from loaded textual-inversion embeddings
    (``stablediff.embeddings.EmbeddingTable`` has it)."""

    def split(self, text: str) -> list[str | Sized]:
        """``text`` cut where embedding names stand: text pieces and embeddings (``len`` = vectors)."""
        ...


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: ``ids`` and ``weights`` of length ``max_length`` (77).

    ``ids`` = BOS, ``n_tokens`` prompt tokens, EOS, then ``pad_id`` up to the length.
    ``weights`` are the emphasis of each prompt token and 1.0 for BOS, EOS and padding.
    ``fixes``: ``(position in ids, embedding)`` for each textual-inversion embedding in the chunk;
    its ``len(embedding)`` vectors stand at ``ids[position:position + len(embedding)]``, which hold
    ``PLACEHOLDER_ID`` (embeddings compare by identity).
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    n_tokens: int
    pad_id: int
    fixes: tuple[tuple[int, Sized], ...] = ()

    @property
    def plain(self) -> bool:
        """True when every weight is 1.0: encoding then returns the encoder's output untouched."""
        return all(w == 1.0 for w in self.weights)

    def blank(self) -> Chunk:
        """The empty-prompt chunk in this chunk's framing (same BOS, EOS, pad and length)."""
        return _frame([], [], bos=self.ids[0], eos=self.ids[self.n_tokens + 1], pad=self.pad_id, length=len(self.ids))


def parse_prompt(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(piece, weight)`` runs by the A1111 emphasis grammar.

    ``(x)`` x1.1, ``[x]`` x(1/1.1), ``(x:w)`` x w, nesting multiplies; ``\\(`` ``\\)`` ``\\[``
    ``\\]`` ``\\\\`` are literal characters. A close bracket without an open one is literal text;
    a bracket left open applies its factor to the rest of the prompt. ``BREAK`` (uppercase, a word
    of its own) becomes the ``BREAK`` marker ``("BREAK", -1.0)``. Adjacent runs of equal weight
    are merged; an empty prompt gives ``[("", 1.0)]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    runs: list[list] = []  # [piece, weight, is_break]
    rounds: list[int] = []  # indices into runs where each open bracket started
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:  # a BREAK keeps its meaning inside brackets (A1111 would scale it)
                run[1] *= factor

    for m in _TOKEN.finditer(text):
        if m.group(0).startswith("\\"):
            runs.append([m.group("escaped") or "", 1.0, False])
        elif m.group("open") == "(":
            rounds.append(len(runs))
        elif m.group("open") == "[":
            squares.append(len(runs))
        elif m.group("weight") is not None and rounds and _is_float(m.group("weight")):
            scale(rounds.pop(), float(m.group("weight")))
        elif m.group("close") == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif m.group("close") == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:  # text, or a bracket / weight with nothing to close: literal
            for i, part in enumerate(_BREAK_WORD.split(m.group(0))):
                if i:
                    runs.append([*BREAK, True])
                runs.append([part, 1.0, False])
    for start in rounds:  # unclosed brackets reach to the end, as in A1111
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)

    merged: list[list] = []
    for run in runs:
        if merged and not run[2] and not merged[-1][2] and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    if not merged:
        return [("", 1.0)]
    return [BREAK if is_break else (piece, weight) for piece, weight, is_break in merged]


def tokenize_prompt(
    tokenizer: Tokenizer,
    text: str,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: PromptEmbeddings | None = None,
) -> list[Chunk]:
    """Parse ``text`` and pack its tokens into chunks of ``max_length - 2`` (75) tokens.

    When a chunk is full and the last comma in it is at most ``comma_backtrack`` tokens from its
    end, the tokens after that comma move to the next chunk, so a phrase is not cut in two (A1111's
    rule; 0 disables it). A ``BREAK`` always starts a new chunk. At least one chunk is returned.

    ``embeddings`` finds textual-inversion embedding names in each piece; an embedding takes one
    position per vector, with the piece's weight, and is never cut by a chunk boundary: when its
    vectors do not fit in what is left of the chunk, it starts the next one (A1111's rule).
    """
    size = tokenizer.max_length - 2
    comma = tokenizer.encode(",")
    comma_id = comma[0] if len(comma) == 1 else None
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, Sized]] = []  # (index in ``ids``, embedding)
    last_comma = -1  # index in ``ids`` of the latest comma, -1 for none

    def flush(keep_from: int | None = None) -> None:
        nonlocal ids, weights, fixes, last_comma
        cut = len(ids) if keep_from is None else keep_from
        chunks.append(
            _frame(
                ids[:cut],
                weights[:cut],
                bos=tokenizer.bos_id,
                eos=tokenizer.eos_id,
                pad=tokenizer.pad_id,
                length=tokenizer.max_length,
                fixes=[f for f in fixes if f[0] < cut],
            )
        )
        # An embedding after the comma moves on with its positions (A1111 leaves it behind).
        fixes = [(i - cut, e) for i, e in fixes if i >= cut]
        ids, weights, last_comma = ids[cut:], weights[cut:], -1

    def make_room(token: int | None) -> None:
        """Start a new chunk when this one is full, moving the phrase after a near comma along."""
        if len(ids) == size:
            near = last_comma >= 0 and size - last_comma <= comma_backtrack
            flush(last_comma + 1 if near and token != comma_id else None)

    for piece, weight in parse_prompt(text):
        if (piece, weight) == BREAK:
            flush()
            continue
        for part in (piece,) if embeddings is None else embeddings.split(piece):
            if not isinstance(part, str):  # an embedding: its vectors stay together in one chunk
                n = len(part)
                if not 1 <= n <= size:
                    raise ValueError(f"an embedding has {n} vectors; a chunk holds 1 to {size}")
                make_room(None)
                if len(ids) + n > size:
                    flush()
                fixes.append((len(ids), part))
                ids.extend([PLACEHOLDER_ID] * n)
                weights.extend([weight] * n)
                continue
            for token in tokenizer.encode(part):
                make_room(token)
                if token == comma_id:
                    last_comma = len(ids)
                ids.append(token)
                weights.append(weight)
    if ids or not chunks:
        flush()
    return chunks


def pad_chunks(a: Sequence[Chunk], b: Sequence[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
    """Give both prompts the same number of chunks by appending empty-prompt chunks to the shorter
    (the conditional and unconditional batches of CFG must have the same sequence length)."""
    if not a or not b:
        raise ValueError("each prompt must have at least one chunk (tokenize_prompt always gives one)")
    a, b = list(a), list(b)
    a += [a[0].blank()] * (len(b) - len(a))
    b += [b[0].blank()] * (len(a) - len(b))
    return a, b


def encode_chunks(
    text_encoder: Callable[[Tensor], Tensor], chunks: Sequence[Chunk], device: torch.device | str | None = None
) -> Tensor:
    """Encode each chunk alone (``ids`` as a ``[1, 77]`` int64 tensor on ``device`` ->
    ``[1, 77, D]``), apply its weights, and concatenate: ``[1, 77 * len(chunks), D]``.

    A chunk whose weights are all 1.0 is passed through untouched, so a plain prompt gives
    exactly the encoder's output. A chunk holding textual-inversion embeddings is encoded as
    ``text_encoder(ids, chunk.fixes)``; the others as ``text_encoder(ids)``.
    """
    if not chunks:
        raise ValueError("encode_chunks needs at least one chunk")
    out = []
    for i, chunk in enumerate(chunks):
        ids = torch.tensor([chunk.ids], dtype=torch.long, device=device)
        z = text_encoder(ids, chunk.fixes) if chunk.fixes else text_encoder(ids)
        if not isinstance(z, Tensor) or z.ndim != 3 or z.shape[:2] != ids.shape:
            got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"text_encoder must return a [1, {ids.shape[1]}, D] tensor; chunk {i} gave {got}")
        out.append(z if chunk.plain else apply_weights(z, chunk.weights))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


# A text encoder that also returns its pooled embedding: ids [1, 77] -> ([1, 77, D], [1, P]).
PooledEncoder = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True, eq=False)  # holds tensors
class SDXLConditioning:
    """SDXL's text conditioning of one generation: the cross-attention contexts
    ``[1, 77 * chunks, D1 + D2]`` and the pooled embeddings ``[1, P]`` of the prompt and of the
    negative prompt (the U-Net's CFG batch)."""

    context: Tensor
    pooled: Tensor
    uncond_context: Tensor
    uncond_pooled: Tensor


def encode_sdxl_chunks(
    encoder: Callable[[Tensor], Tensor],
    encoder_2: PooledEncoder,
    chunks: Sequence[Chunk],
    chunks_2: Sequence[Chunk],
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """One prompt through SDXL's two text encoders: ``(context [1, 77 * n, D1 + D2], pooled [1, P])``.

    ``chunks`` (first tokenizer) and ``chunks_2`` (second) must be equally many. Each encoder's
    chunks are encoded and weighted by ``encode_chunks`` (so emphasis rescales each encoder's output
    to its own mean, as A1111 does), then the two are concatenated along the width. The pooled
    embedding is ``encoder_2``'s for the first chunk, as the web UIs take it (diffusers reads one
    chunk only); emphasis never touches it. A chunk with textual-inversion embeddings is encoded as
    ``encoder(ids, chunk.fixes)`` (``encode_chunks``), on each encoder.
    """
    if len(chunks) != len(chunks_2):
        raise ValueError(f"the two encoders need as many chunks: {len(chunks)} != {len(chunks_2)} (pad them first)")
    pooled: list[Tensor] = []

    def second(ids: Tensor, *fixes) -> Tensor:
        z, p = encoder_2(ids, *fixes)
        pooled.append(p)
        return z

    first = encode_chunks(encoder, chunks, device)
    context = torch.cat([first, encode_chunks(second, chunks_2, device)], dim=-1)
    return context, pooled[0]


def encode_sdxl_prompt(
    tokenizers: tuple[Tokenizer, Tokenizer],
    encoders: tuple[Callable[[Tensor], Tensor], PooledEncoder],
    prompt: str,
    negative_prompt: str = "",
    prompt_2: str | None = None,
    negative_prompt_2: str | None = None,
    *,
    force_zeros_for_empty_prompt: bool = False,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: PromptEmbeddings | None = None,
    device: torch.device | str | None = None,
) -> SDXLConditioning:
    """SDXL's conditioning for a prompt and a negative prompt.

    The first tokenizer/encoder reads ``prompt``, the second ``prompt_2`` (``prompt`` when None or
    empty, as in diffusers); both are chunked by ``tokenize_prompt`` (75-token chunks, emphasis,
    BREAK), each tokenizer padding with its own pad token (SDXL's second pads with "!"). All chunk
    lists, the negative ones included, are padded to the same count with empty-prompt chunks.
    Clip skip is the encoders' business (they are callables, e.g. bound with ``skip_layers``).

    ``force_zeros_for_empty_prompt`` (diffusers' SDXL pipeline flag, true in SDXL base's
    model_index.json; A1111 does the same for SDXL): when both negative prompts are empty, the
    negative context and pooled embedding are zeros instead of the encoding of "".
    ``embeddings`` (textual inversion) are found in every prompt by each tokenizer alike; the
    encoders then take ``(ids, fixes)`` for chunks that hold them (see ``encode_sdxl_chunks``).
    """
    tok, tok_2 = tokenizers
    texts = [(tok, prompt), (tok_2, prompt_2 or prompt)]
    zero_uncond = force_zeros_for_empty_prompt and negative_prompt == "" and not negative_prompt_2
    if not zero_uncond:
        texts += [(tok, negative_prompt), (tok_2, negative_prompt_2 or negative_prompt)]
    lists = [tokenize_prompt(t, text, comma_backtrack=comma_backtrack, embeddings=embeddings) for t, text in texts]
    n = max(len(chunks) for chunks in lists)
    lists = [chunks + [chunks[0].blank()] * (n - len(chunks)) for chunks in lists]
    context, pooled = encode_sdxl_chunks(*encoders, lists[0], lists[1], device)
    if zero_uncond:
        return SDXLConditioning(context, pooled, torch.zeros_like(context), torch.zeros_like(pooled))
    return SDXLConditioning(context, pooled, *encode_sdxl_chunks(*encoders, lists[2], lists[3], device))


def encode_pooled_prompt(
    tokenizer: Tokenizer,
    encoder: PooledEncoder,
    prompt: str,
    negative_prompt: str = "",
    *,
    force_zeros_for_empty_prompt: bool = False,
    device: torch.device | str | None = None,
) -> SDXLConditioning:
    """SDXL refiner's conditioning: one text encoder (bigG) gives the context and the pooled
    embedding, as diffusers' refiner reads ``prompt`` / ``negative_prompt`` with its only tokenizer.
    Chunking, emphasis and the pooled first chunk as in ``encode_sdxl_chunks``."""
    pooled: list[Tensor] = []

    def encode(ids: Tensor) -> Tensor:
        z, p = encoder(ids)
        pooled.append(p)
        return z

    def conditioning(chunks: Sequence[Chunk]) -> tuple[Tensor, Tensor]:
        pooled.clear()
        return encode_chunks(encode, chunks, device), pooled[0]

    cond, uncond = pad_chunks(tokenize_prompt(tokenizer, prompt), tokenize_prompt(tokenizer, negative_prompt))
    context, pooled_cond = conditioning(cond)
    if force_zeros_for_empty_prompt and negative_prompt == "":
        return SDXLConditioning(context, pooled_cond, torch.zeros_like(context), torch.zeros_like(pooled_cond))
    return SDXLConditioning(context, pooled_cond, *conditioning(uncond))


def apply_weights(z: Tensor, weights: Sequence[float]) -> Tensor:
    """Emphasis as A1111 does it: ``z * w`` per token, then rescale so the mean over the whole
    ``[1, L, D]`` tensor is what it was (so emphasis changes direction, not overall magnitude).

    Means are taken in float32 (fp16 sums of 59k values lose precision). If the weighted mean is 0
    the rescale is skipped rather than dividing by zero.
    """
    w = torch.tensor(list(weights), dtype=z.dtype, device=z.device).reshape(1, -1, 1)
    original_mean = z.float().mean()
    weighted = z * w
    new_mean = weighted.float().mean()
    if new_mean == 0 or not torch.isfinite(new_mean):
        return weighted
    return weighted * (original_mean / new_mean).to(z.dtype)


def _frame(
    ids: list[int],
    weights: list[float],
    *,
    bos: int,
    eos: int,
    pad: int,
    length: int,
    fixes: Sequence[tuple[int, Sized]] = (),
) -> Chunk:
    """BOS + ids + EOS + padding, weights 1.0 outside the prompt tokens; fixes shifted past BOS."""
    n = len(ids)
    assert n <= length - 2, "chunk overflow"
    padding = length - 2 - n
    return Chunk(
        ids=(bos, *ids, eos, *([pad] * padding)),
        weights=(1.0, *(float(w) for w in weights), 1.0, *([1.0] * padding)),
        n_tokens=n,
        pad_id=pad,
        fixes=tuple((i + 1, e) for i, e in fixes),
    )


def _is_float(text: str) -> bool:
    # "[.\d]+" also matches "." or "1.2.3"; A1111 raises there, we keep such text literal.
    try:
        float(text)
    except ValueError:
        return False
    return True
