"""Train a byte-level BPE vocabulary in CLIP's format, so `CLIPTokenizer` loads it like CLIP's own.

The pieces are those of `stablediff.tokenizer`: text is normalised and lower-cased, split into
words by the CLIP pattern, each word is written in the 256-symbol byte alphabet of
`bytes_to_unicode`, and its last symbol carries the end-of-word marker "</w>". Training then
repeats: merge the most frequent adjacent pair of symbols (over all words, weighted by how often
each word occurs) into one new symbol (Sennrich et al. 2016). Pairs never cross word boundaries.

The vocabulary is laid out as CLIP's: ids 0-255 the byte symbols, 256-511 the same with "</w>",
then one id per merge (in merge order), then `<|startoftext|>` and `<|endoftext|>` (the last id,
as in CLIP, so the EOS position is also the argmax of the ids). So `vocab_size` = 512 + merges + 2.

Speed: the corpus is reduced to distinct words with counts; pair counts are kept up to date
incrementally, only for the words that contain the merged pair (an index pair -> words), and the
best pair comes from a max-heap with lazy deletion. A 50k-caption corpus trains in about a second.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable

from stablediff.tokenizer import _PAT_HF as WORD_PATTERN
from stablediff.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, bytes_to_unicode
from stablediff.tokenizer import _hf_normalize as normalize  # the exact cleaning `encode` applies

logger = logging.getLogger(__name__)

END_OF_WORD = "</w>"
BASE_SIZE = 512  # 256 byte symbols + the same 256 with "</w>"
MIN_VOCAB_SIZE = BASE_SIZE + 2  # no merge at all: bytes, bytes</w>, BOS, EOS


def base_symbols() -> list[str]:
    """The 512 symbols every vocabulary starts with, in id order."""
    chars = list(bytes_to_unicode().values())
    return [*chars, *(c + END_OF_WORD for c in chars)]


def word_symbols(word: str) -> tuple[str, ...]:
    """A pre-tokenised word as its initial BPE symbols: bytes as characters, the last with "</w>"."""
    byte_encoder = bytes_to_unicode()
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def pre_tokenize(text: str) -> list[str]:
    """The words of `text`, in order, as `CLIPTokenizer.encode` (transformers mode) splits them.
    Literal special tokens are dropped: they are ids of their own, not text to learn from."""
    if not isinstance(text, str):
        raise TypeError(f"corpus items must be str, got {type(text).__name__}")
    return [w for w in WORD_PATTERN.findall(normalize(text)) if w not in (BOS_TOKEN, EOS_TOKEN)]


def count_words(texts: Iterable[str]) -> Counter[str]:
    """Words of the corpus (see `pre_tokenize`) with their counts."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pre_tokenize(text))
    return counts


def _pairs(word: list[str]) -> Counter[tuple[str, str]]:
    return Counter(zip(word[:-1], word[1:], strict=True))


def _merge_word(word: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """Every occurrence of `pair` merged, left to right without overlap (as `CLIPTokenizer._bpe`)."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Up to `num_merges` merges learned from `word_counts` (word -> count), in merge order.

    The next merge is the pair with the highest count; ties go to the pair whose two symbol
    strings sort first, so the result depends only on the word counts, not on corpus order or
    hash seeds. Stops early when no pair is left (every word is one symbol).
    """
    words = [list(word_symbols(w)) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> words that may hold it
    for index, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair, n in _pairs(word).items():
            pair_counts[pair] += n * freq
            where[pair].add(index)
    # Max-heap by count via negation; the pair strings themselves are the tie-break. A heap entry
    # may be stale: counts of pairs that do not contain the newest symbol only ever go down, so a
    # stored count is an upper bound, and a stale top is re-pushed with its true count.
    heap = [(-n, a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        neg, a, b = heapq.heappop(heap)
        true = pair_counts.get((a, b), 0)
        if true <= 0:
            continue
        if -neg != true:
            heapq.heappush(heap, (-true, a, b))
            continue
        pair, merged = (a, b), a + b
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for index in where.pop(pair):
            word = words[index]
            if len(word) < 2:
                continue
            new = _merge_word(word, pair, merged)
            if len(new) == len(word):  # a stale index: the pair left this word in an earlier merge
                continue
            before, after = _pairs(word), _pairs(new)
            freq = freqs[index]
            for p in before.keys() | after.keys():
                delta = after.get(p, 0) - before.get(p, 0)
                if delta:
                    pair_counts[p] += delta * freq
                    touched.add(p)
            for p in after:
                where[p].add(index)
            words[index] = new
        pair_counts.pop(pair, None)
        for p in touched:  # new pairs (with `merged`) go in; grown counts only happen for those
            n = pair_counts.get(p, 0)
            if n <= 0:
                pair_counts.pop(p, None)
            elif merged in p:
                heapq.heappush(heap, (-n, p[0], p[1]))
    return merges


def build_vocab(merges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: base symbols, one id per new merged string, then BOS and EOS."""
    vocab: dict[str, int] = {}
    for token in (*base_symbols(), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN):
        vocab.setdefault(token, len(vocab))  # two merge paths to one string share its id
    return vocab


def train_bpe(texts: Iterable[str], vocab_size: int, *, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP-format BPE tokenizer learned from `texts` (pad token = EOS, as SD 1.x).

    `vocab_size` is the target (>= 514: 512 byte symbols + BOS + EOS); a corpus with fewer
    possible merges gives a smaller vocabulary, which is logged. Raises ValueError for a
    `vocab_size` below the minimum or an empty corpus.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes, 256 bytes + </w>, "
            f"<|startoftext|>, <|endoftext|>), got {vocab_size!r}"
        )
    counts = count_words(texts)
    if not counts:
        raise ValueError("cannot train a BPE vocabulary on an empty corpus (no words in any text)")
    # A merge whose string already exists adds no id, so learn until the vocabulary is full.
    merges: list[tuple[str, str]] = []
    want = vocab_size - MIN_VOCAB_SIZE
    while True:
        merges = learn_merges(counts, want)
        vocab = build_vocab(merges)
        if len(vocab) >= vocab_size or len(merges) < want:
            break
        want += vocab_size - len(vocab)
    if len(vocab) > vocab_size:  # rare: trim merges whose strings were duplicates at the end
        while len(build_vocab(merges)) > vocab_size:
            merges.pop()
        vocab = build_vocab(merges)
    if len(vocab) < vocab_size:
        logger.warning(
            "BPE: the corpus (%d distinct words) allows only %d merges; vocabulary has %d ids, not %d",
            len(counts),
            len(merges),
            len(vocab),
            vocab_size,
        )
    return CLIPTokenizer(
        vocab,
        merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        max_length=max_length,
    )


__all__ = ["MIN_VOCAB_SIZE", "build_vocab", "count_words", "learn_merges", "pre_tokenize", "train_bpe", "word_symbols"]
