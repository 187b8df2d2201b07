"""The tokenizer stage: learn a CLIP-format BPE vocabulary from the training captions.

Not a gradient loop, so not a `Stage`: the command line calls `TokenizerStage(config).fit(out)`.
The corpus is what the later stages will read (`config.data`): `caption_corpus` lists it without
reading an image.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stablediff.train.bpe import train_bpe
from stablediff.train.config import TrainConfig
from stablediff.train.data.stage_data import caption_corpus
from stablediff.train.exports import TOKENIZER_DIR

logger = logging.getLogger(__name__)


class TokenizerStage:
    """Learn the vocabulary of a run: `fit(out_dir)` writes `out_dir/tokenizer/` and returns it."""

    name = "tokenizer"

    def __init__(self, config: TrainConfig):
        self.config = config

    def fit(self, out_dir: str | Path) -> Path:
        """Train BPE to `config.vocab_size` on the corpus; save the four tokenizer files.

        The folder loads with `CLIPTokenizer.from_folder` (and transformers' CLIPTokenizer).
        Nothing is written when training fails (bad data, too small a vocab_size).
        """
        start = time.perf_counter()
        corpus = caption_corpus(self.config)
        tokenizer = train_bpe(corpus, self.config.vocab_size)
        folder = tokenizer.save(Path(out_dir) / TOKENIZER_DIR)
        logger.info(
            "tokenizer: %d captions -> %d ids (%d merges) in %.1f s, saved to %s",
            len(corpus),
            tokenizer.vocab_size,
            len(tokenizer.merges),
            time.perf_counter() - start,
            folder,
        )
        return folder


__all__ = ["TokenizerStage"]
