"""The tokenizer stage: learn a CLIP-format BPE vocabulary from the training captions.

Not a gradient loop, so not a `Stage`: the command line calls `TokenizerStage(config).fit(out)`.
The corpus is what the later stages will read (`config.data`):

- "shapes": the captions of `ShapesDataset(config.shapes_size, config.seed)`, generated without
  rendering a single image (scenes and captions come from their own seeded generators);
- a captioned folder: the captions of exactly the items `CaptionedFolder` would train on
  (`metadata.jsonl` or `.txt` files; unreadable images are skipped there and here alike);
- a latent cache (`.safetensors`): the captions stored in its metadata.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

from stablediff.tokenizer import CLIPTokenizer
from stablediff.train.bpe import train_bpe
from stablediff.train.captions import caption
from stablediff.train.config import TrainConfig
from stablediff.train.data import CaptionedFolder
from stablediff.train.shapes import ShapesDataset, item_seed
from stablediff.weights.io import read_metadata

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def shapes_captions(n: int, seed: int, split: str = "train") -> Iterator[str]:
    """The captions of `ShapesDataset(n, seed, split)` items 0..n-1, without drawing the images.

    Uses the same per-item generators as `ShapesDataset.__getitem__` (scene, then caption seeded
    by (seed, split, index, "caption")), so `shapes_captions(n, s)` lists `ds[i][1]` exactly.
    """
    dataset = ShapesDataset(n, seed, split)
    for index in range(n):
        yield caption(dataset.scene(index), random.Random(item_seed(seed, split, index, "caption")))


def caption_corpus(config: TrainConfig) -> list[str]:
    """Every caption of `config.data`, in dataset order (see the module docstring)."""
    data = config.data
    if not data:
        raise ValueError("the tokenizer stage needs --data: a captioned folder, a latent cache or 'shapes'")
    if data == "shapes":
        return list(shapes_captions(config.shapes_size, config.seed))
    path = Path(data)
    if path.is_file() and path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "captions" not in meta:
            raise ValueError(f"{path} has no 'captions' metadata: not a latent cache")
        return list(json.loads(meta["captions"]))
    # verify="header": only captions are needed, but the same items as training (bad files skipped).
    return [text for _, text in CaptionedFolder(path, verify="header", strict=config.strict).items]


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
        logger.info("tokenizer: %d captions -> %d ids (%d merges) in %.1f s, saved to %s", len(corpus),
                    tokenizer.vocab_size, len(tokenizer.merges), time.perf_counter() - start, folder)
        return folder


def load_tokenizer(path: str | Path | None) -> CLIPTokenizer:
    """The tokenizer a run uses: a tokenizer folder, a run folder holding `tokenizer/`, or, for an
    empty path, the standard CLIP vocabulary."""
    if not path:
        return CLIPTokenizer.default()
    folder = Path(path)
    if not (folder / "vocab.json").is_file() and (folder / TOKENIZER_DIR / "vocab.json").is_file():
        folder = folder / TOKENIZER_DIR
    return CLIPTokenizer.from_folder(folder)


__all__ = ["TOKENIZER_DIR", "TokenizerStage", "caption_corpus", "load_tokenizer", "shapes_captions"]
