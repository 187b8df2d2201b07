"""CLIP byte-level BPE tokenizer: prompt text -> the token ids the CLIP text encoder reads.

Pure Python (stdlib, ``regex``, ``ftfy``), no torch, so data loaders and front ends can use it.
The standard 49408-token vocabulary ships as package data (``data/bpe_simple_vocab_16e6.txt.gz``).

Two behaviours, chosen by ``compat``; they agree on ordinary prompts:

* ``"transformers"`` (default) gives the ids of ``transformers.CLIPTokenizer`` 5.x, the tokenizer that
  diffusers pipelines use, so our pipelines match the reference. It cleans text with NFC, whitespace
  collapse and per-character lower-casing only (no ftfy, no HTML unescaping), and cuts the special
  tokens out of the text wherever they occur; with SD2.x that includes the pad token ``!`` (id 0).
* ``"openai"`` gives the ids of openai/CLIP's ``simple_tokenizer``: ftfy, HTML unescaping (twice),
  whitespace collapse, lower-casing, then the case-insensitive CLIP pattern.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import unicodedata
import uuid
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import regex

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
COMPAT_MODES = ("transformers", "openai")
FOLDER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# Bounds on what a tokenizer folder may make us allocate: the CLIP files are 0.5-3.6 MB and 49408
# entries; the largest real BPE vocabularies have a few hundred thousand.
MAX_FILE_BYTES = 64 << 20
MAX_ENTRIES = 1 << 20

_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")
_NUM_MERGES = 49152 - 256 - 2  # CLIP used this many merges; the gz file holds more lines
_CACHE_LIMIT = 1 << 16  # bound the BPE cache so a long-running server cannot grow it forever
_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# OpenAI matches case-insensitively; transformers' Split pre-tokenizer does not. After lower-casing
# this only matters for "ſ" (long s), which case-folds to "s": "'ſ" is one piece for OpenAI only.
_PAT_OPENAI = regex.compile(_PATTERN, regex.IGNORECASE)
_PAT_HF = regex.compile(_PATTERN)
_WHITESPACE = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable character, so BPE never sees whitespace or control bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 get code points 256, 257, ... in byte
    order. The insertion order (printable first) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


@lru_cache(maxsize=1)
def _packaged_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocabulary and merges built from the packaged gz file (parsed once per process)."""
    raw = resources.files(__package__).joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = tuple(
        _parse_merge(line, "bpe_simple_vocab_16e6.txt.gz", i + 2) for i, line in enumerate(lines[1 : 1 + _NUM_MERGES])
    )  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPTokenizer:
    """CLIP BPE tokenizer. ``tok(prompt)`` gives ``max_length`` ids: BOS, text, EOS, padding.

    ``added_tokens`` maps each added (special) token to its transformers ``normalized`` flag: False
    means it is cut out of the raw text, True means out of the cleaned text (so "<|ENDOFTEXT|>"
    matches too). ``None`` takes what transformers makes of the SD1.x/SD2.x hub folders.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        max_length: int = 77,
        added_tokens: Mapping[str, bool] | None = None,
        compat: str = "transformers",
    ) -> None:
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        self.encoder = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.unk_token = unk_token
        if added_tokens is None:  # the hub folders: bos/eos/unk "normalized": true, pad a plain string
            added_tokens = _resolve_flags([(bos_token, True), (eos_token, True), (unk_token, True), (pad_token, False)])
        missing = [
            t for t in dict.fromkeys((bos_token, eos_token, pad_token, unk_token, *added_tokens)) if t not in vocab
        ]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        self.added_tokens = dict(added_tokens)
        self.max_length, self.compat = max_length, compat
        self.bos_id, self.eos_id, self.pad_id = (self.encoder[t] for t in (bos_token, eos_token, pad_token))
        self._byte_encoder = bytes_to_unicode()
        self._raw_split = _splitter(t for t, normalized in self.added_tokens.items() if not normalized)
        self._norm_split = _splitter(t for t, normalized in self.added_tokens.items() if normalized)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49408 for the standard vocabulary)."""
        return len(self.encoder)

    @classmethod
    def default(cls, pad_token: str = EOS_TOKEN, *, compat: str = "transformers") -> CLIPTokenizer:
        """The standard CLIP vocabulary from package data. SD1.x pads with EOS, SD2.x with ``"!"``."""
        vocab, merges = _packaged_vocab()
        return cls(vocab, merges, pad_token=pad_token, compat=compat)

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str], *, compat: str = "transformers") -> CLIPTokenizer:
        """Load a diffusers/transformers ``tokenizer/`` folder: vocab.json + merges.txt, or (as
        transformers 5 saves it) tokenizer.json alone; then tokenizer_config.json and the optional
        special_tokens_map.json. vocab.json wins when a folder has both."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        json_added = None  # the added tokens of a tokenizer.json
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            if not (folder / "vocab.json").is_file():
                raise FileNotFoundError(f"tokenizer folder {folder} has no vocab.json (and no tokenizer.json)")
            vocab = _read_json(folder, "vocab.json")
            merges_path = _require(folder, "merges.txt")
            # split("\n"), not splitlines(): the latter also breaks at characters such as U+0085.
            lines = _read_text(merges_path).split("\n")
            merges = [
                _parse_merge(line.rstrip("\r"), merges_path, i + 1)
                for i, line in enumerate(lines)
                if line.rstrip("\r") and not (i == 0 and line.startswith("#version"))
            ]
            _check_vocabulary(vocab, merges, folder / "vocab.json", merges_path)
        else:
            vocab, merges, json_added = _read_tokenizer_json(folder / "tokenizer.json")
        config = _read_json(folder, "tokenizer_config.json")
        special_map = {}  # optional: older folders repeat the special tokens here
        if (folder / "special_tokens_map.json").exists():
            special_map = _read_json(folder, "special_tokens_map.json")
        named, added = _special_tokens(config, special_map, json_added)
        max_length = config.get("model_max_length", 77)
        return cls(vocab, merges, **named, max_length=max_length, added_tokens=added, compat=compat)

    def to_dict(self) -> dict:
        """Everything the tokenizer is, as JSON-ready data (a trained vocabulary travels inside a
        model file's metadata this way)."""
        return {
            "vocab": self.encoder,
            "merges": [f"{a} {b}" for a, b in self.merges],
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "max_length": self.max_length,
            "added_tokens": self.added_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict, *, compat: str = "transformers") -> CLIPTokenizer:
        merges = [tuple(m.split(" ")) for m in data["merges"]]
        named = {k: data[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "max_length", "added_tokens")}
        return cls(data["vocab"], merges, **named, compat=compat)

    def is_default_vocabulary(self) -> bool:
        """True for the standard CLIP vocabulary (which need not be stored with a model)."""
        return self.vocab_size == 49408 and self.encoder == _packaged_vocab()[0]

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the four tokenizer files (readable by transformers' CLIPTokenizer); returns the folder.

        Every file goes to a temporary name first and is renamed only when all four are written.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }

        def token(content: str) -> dict:
            normalized = self.added_tokens.get(content, False)
            return {
                "content": content,
                "lstrip": False,
                "normalized": normalized,
                "rstrip": False,
                "single_word": False,
            }

        # added_tokens_decoder states each flag once, so no reader has to reconcile duplicates.
        decoder = {
            str(self.encoder[t]): {**token(t), "special": True}
            for t in sorted(self.added_tokens, key=self.encoder.__getitem__)
        }
        config = {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            **named,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": self.max_length,
            "tokenizer_class": "CLIPTokenizer",
        }
        _write_all(
            folder,
            {
                "vocab.json": json.dumps(self.encoder, ensure_ascii=False),
                "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                "special_tokens_map.json": json.dumps({k: token(t) for k, t in named.items()}, indent=2) + "\n",
            },
        )
        return folder

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.compat == "openai":
            return self._bpe_words(_PAT_OPENAI.findall(_openai_clean(text)))
        # transformers order: cut raw-matched added tokens, normalize what is left, cut the
        # normalized-matched ones, then split into words.
        ids: list[int] = []
        for segment, is_added in _split(text, self._raw_split):
            if is_added:
                ids.append(self.encoder[segment])
                continue
            for piece, is_added_norm in _split(_hf_normalize(segment), self._norm_split):
                ids.extend([self.encoder[piece]] if is_added_norm else self._bpe_words(_hf_words(piece)))
        return ids

    def __call__(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        """BOS + ids[:max_length-2] + EOS, padded with ``pad_id`` to ``max_length``.

        A list of prompts gives a list of such lists.
        """
        if isinstance(text, str):
            return self._frame(self.encode(text))
        if isinstance(text, (list, tuple)):
            bad = next((i for i, item in enumerate(text) if not isinstance(item, str)), None)
            if bad is not None:
                raise TypeError(f"text[{bad}] must be a str, got {type(text[bad]).__name__}")
            return [self._frame(self.encode(item)) for item in text]
        raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")

    def _frame(self, ids: list[int]) -> list[int]:
        framed = [self.bos_id, *ids[: self.max_length - 2], self.eos_id]
        return framed + [self.pad_id] * (self.max_length - len(framed))

    def _bpe_words(self, words: Sequence[str]) -> list[int]:
        ids: list[int] = []
        for word in words:
            ids.extend(self._bpe("".join(self._byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def _bpe(self, token: str) -> list[int]:
        """Merge the lowest-ranked adjacent pair until none is in the merge table; ids of the parts."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        if token in (BOS_TOKEN, EOS_TOKEN):  # OpenAI's pattern yields these whole; they are single ids
            return [self.encoder[token]]
        word = [*token[:-1], token[-1] + "</w>"]  # "</w>" marks the end of a word
        unranked = len(self.ranks)
        while len(word) > 1:
            best = min(zip(word[:-1], word[1:], strict=True), key=lambda p: self.ranks.get(p, unranked))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):  # merge every occurrence, left to right, without overlap
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[part] for part in word]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = ids
        return ids


def _openai_clean(text: str) -> str:
    """openai/CLIP cleaning: ftfy, HTML entities (twice: "&amp;amp;" occurs in scraped captions),
    whitespace collapse, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _hf_normalize(text: str) -> str:
    """transformers' normalizer: NFC, whitespace runs -> " ", per-character lower-case."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # str.lower() turns a word-final "Σ" into "ς"; the tokenizers normalizer maps each
    # character alone, which always gives "σ". Sigma is str.lower()'s only context rule.
    return text.replace("Σ", "σ").lower()


def _hf_words(text: str) -> Iterator[str]:
    """CLIP pattern pieces as transformers yields them. Its ByteLevel pre-tokenizer re-splits each
    piece with the GPT-2 pattern, which leaves all pieces whole except a literal special token that
    was not cut out as an added token: that one becomes "<|", the name, "|>"."""
    for word in _PAT_HF.findall(text):
        if word in (BOS_TOKEN, EOS_TOKEN):
            yield from ("<|", word[2:-2], "|>")
        else:
            yield word


def _splitter(tokens: Iterator[str]) -> regex.Pattern[str] | None:
    # Longest first, so that at each position the longest added token wins, as in tokenizers.
    alternatives = sorted(set(tokens), key=len, reverse=True)
    return regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")") if alternatives else None


def _split(text: str, pattern: regex.Pattern[str] | None) -> Iterator[tuple[str, bool]]:
    """Pieces of ``text`` with a flag telling whether the piece is an added token."""
    if pattern is None:
        yield text, False
        return
    for i, part in enumerate(pattern.split(text)):
        if part:
            yield part, i % 2 == 1  # split() with one capture group alternates text, token, text...


def _resolve_flags(tokens: Sequence[tuple[str, bool]]) -> dict[str, bool]:
    # When a folder gives one token contradictory flags (SD1.x: eos/unk "normalized": true, pad the
    # same token as a plain string, i.e. false), transformers' result depends on its internal
    # ordering; "False wins" reproduces it for the SD1.x and SD2.x hub folders.
    flags: dict[str, bool] = {}
    for token, normalized in tokens:
        flags[token] = flags.get(token, True) and normalized
    return flags


def _special_tokens(
    config: dict, special_map: dict, json_added: dict[str, dict] | None = None
) -> tuple[dict[str, str], dict[str, bool]]:
    """Named special tokens and the added-token flags of a folder, read the way transformers reads
    them: a modern ``added_tokens_decoder`` wins; otherwise special_tokens_map.json overrides the
    config, and a tokenizer.json's added tokens (``json_added``) give the flags. Tokens may be
    strings (``normalized`` false) or dicts with a "content" key."""
    decoder = config.get("added_tokens_decoder")
    values = {k: config[k] for k in _NAMED if config.get(k) is not None}
    if decoder is None:
        values.update({k: special_map[k] for k in _NAMED if special_map.get(k) is not None})
        decoder = json_added
    fixed = {_content(v): bool(v.get("normalized", not v.get("special", False))) for v in (decoder or {}).values()}
    named, pending = {}, []
    for key in _NAMED:
        value = values.get(key, BOS_TOKEN if key == "bos_token" else EOS_TOKEN)
        named[key] = _content(value)
        if named[key] not in fixed:
            pending.append((named[key], isinstance(value, dict) and bool(value.get("normalized", False))))
    return named, {**_resolve_flags(pending), **fixed}


def _content(value: object) -> str:
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str):
        raise ValueError(f"special token must be a string or a dict with a 'content' string, got {value!r}")
    return content


def _parse_merge(line: str, source: object, lineno: int) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{source}:{lineno}: a merge line must be two tokens and one space, got {line!r}")
    return parts[0], parts[1]


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer folder {folder} has no {name}")
    return path


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is {size} bytes; a tokenizer file may be at most {MAX_FILE_BYTES} bytes")
    return path.read_text(encoding="utf-8")


def _read_json(folder: Path, name: str) -> dict:
    path = _require(folder, name)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_vocabulary(vocab: dict, merges: Sequence, vocab_source: object, merges_source: object) -> None:
    """Entry counts within MAX_ENTRIES, and a vocabulary that maps strings to ids >= 0."""
    for what, entries, source in (("vocabulary", vocab, vocab_source), ("merge list", merges, merges_source)):
        if len(entries) > MAX_ENTRIES:
            raise ValueError(f"{source}: the {what} has {len(entries)} entries, more than the limit of {MAX_ENTRIES}")
    bad = next(((t, i) for t, i in vocab.items() if type(i) is not int or i < 0), None)
    if bad is not None:
        raise ValueError(f"{vocab_source}: token {bad[0]!r} has id {bad[1]!r}; ids must be integers >= 0")


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, dict]]:
    """Vocabulary, merges and added tokens (as an ``added_tokens_decoder``) of a tokenizers-library
    ``tokenizer.json`` holding a CLIP BPE model. Merges are "a b" strings (tokenizers before 0.20)
    or ["a", "b"] pairs (later versions)."""
    data = _read_json(path.parent, path.name)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise ValueError(f"{path}: model must be a BPE model (type 'BPE'), got {kind!r}")
    if model.get("end_of_word_suffix") != "</w>":
        raise ValueError(f"{path}: model.end_of_word_suffix is {model.get('end_of_word_suffix')!r}, not CLIP's '</w>'")
    vocab, raw_merges, added = model.get("vocab"), model.get("merges"), data.get("added_tokens") or []
    for key, value, typ in (
        ("model.vocab", vocab, dict),
        ("model.merges", raw_merges, list),
        ("added_tokens", added, list),
    ):
        if not isinstance(value, typ):
            raise ValueError(f"{path}: {key} must be a JSON {typ.__name__.replace('dict', 'object')}")
    _check_vocabulary(vocab, raw_merges, f"{path} (model.vocab)", f"{path} (model.merges)")
    merges = []
    for i, merge in enumerate(raw_merges):
        if isinstance(merge, str):
            merges.append(_parse_merge(merge, f"{path} model.merges", i))
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) and p for p in merge):
            merges.append((merge[0], merge[1]))
        else:
            raise ValueError(f'{path}: model.merges[{i}] must be "a b" or ["a", "b"], got {merge!r}')
    vocab = dict(vocab)
    decoder: dict[str, dict] = {}
    if len(added) > MAX_ENTRIES:
        raise ValueError(f"{path}: added_tokens has {len(added)} entries, more than the limit of {MAX_ENTRIES}")
    for i, token in enumerate(added):
        content = token.get("content") if isinstance(token, dict) else None
        token_id = token.get("id") if isinstance(token, dict) else None
        if not isinstance(content, str) or type(token_id) is not int or token_id < 0:
            raise ValueError(f"{path}: added_tokens[{i}] must be an object with a 'content' string and an 'id' >= 0")
        if vocab.setdefault(content, token_id) != token_id:
            raise ValueError(f"{path}: added token {content!r} has id {token_id} but {vocab[content]} in model.vocab")
        decoder[str(token_id)] = token
    return vocab, merges, decoder


def _write_all(folder: Path, texts: Mapping[str, str]) -> None:
    """Write every file under a temporary name, then rename them all; on failure remove the temps."""
    temps: dict[str, str] = {}
    try:
        for name, text in texts.items():
            temps[name] = str(folder / f".{name}.{uuid.uuid4().hex}.tmp")
            # os.open with 0o666 lets the umask decide the mode, as for any ordinary file we write
            fd = os.open(temps[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(text)
        for name, temp in temps.items():
            os.replace(temp, folder / name)
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)
