"""Captioned image folders as training data: ``CaptionedFolder(root) [i] -> (image, caption)``.

Layouts (the first that applies):

1. ``root/metadata.jsonl``: one JSON object per line with ``"file_name"`` (or ``"file"``), a path
   relative to ``root``, and ``"text"``, the caption. When it exists it is the whole list of
   items; ``.txt`` files are then ignored.
2. Otherwise every image file (``.png .jpg .jpeg .webp .bmp``, any case) under ``root``,
   recursively (hidden files and folders skipped), with its caption in the file of the same name
   and suffix ``.txt`` next to it. Items are sorted by path, so the order is the same everywhere.

Bad files policy (checked once, at construction):

- skipped: a zero-byte file, a file that is not an image, a truncated or corrupt image, an image
  smaller than ``min_side`` (default 8 px) on either side, a missing caption file, a caption that
  is not UTF-8, a bad ``metadata.jsonl`` line (not JSON, no file or text field, a missing file or
  one outside ``root``). Each skip is logged (``logging`` warning: path and reason) and recorded
  in ``dataset.skipped`` as ``(path, reason)``; with ``strict=True`` the first one raises
  ``ValueError`` naming the path and the reason instead.
- converted, not skipped (by :func:`stablediff.image.load_image`): transparency is composited
  onto white, 16-bit images are scaled to 8 bits (not clipped), grayscale, palette and CMYK
  become RGB, EXIF orientation is applied. An empty caption file is the caption "".
- ``verify="full"`` (default) decodes every image once at construction, so truncation is found
  before training starts. ``verify="header"`` only reads headers (and PNG checksums), which is
  much faster for large folders; an image that then fails to decode in ``__getitem__`` is logged,
  added to ``skipped`` and replaced by the next good item (``strict``: ``ValueError``).

A missing folder, or no usable item after the skips, is a ``ValueError`` naming the folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from stablediff.image import image_to_tensor, load_image
from stablediff.seeds import derive_seed
from stablediff.train.data.buckets import nearest_bucket

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROPS = ("center", "random")
VERIFY = ("full", "header")


class ImageGeometry(NamedTuple):
    """Where a training image came from, for SDXL's micro-conditioning (Podell et al. 2023, 2.2):
    the image's ``original_size`` (height, width) as loaded, before any resizing, and the top-left
    corner (top, left) of the crop in the resized image as it is seen (after a flip, the crop's
    place in the mirrored image, as diffusers' SDXL script flips before it crops)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def item_geometry(item: Sequence) -> ImageGeometry | None:
    """The `ImageGeometry` a dataset item ``(x, caption, ...)`` carries after its caption, else None."""
    return next((e for e in item[2:] if isinstance(e, ImageGeometry)), None)


def _check_image(path: Path, full: bool, min_side: int) -> tuple[str | None, tuple[int, int]]:
    """(why ``path`` is not a usable image or None, its (width, height) as stored)."""
    if path.stat().st_size == 0:
        return "empty file (0 bytes)", (0, 0)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if full:
                img.load()
            else:
                img.verify()  # reads the file without decoding pixels; PNG checksums are checked
    except Image.UnidentifiedImageError:
        return "not an image (format not recognised)", (0, 0)
    except Image.DecompressionBombError as err:
        return f"image too large to open safely ({err})", (0, 0)
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL's ways of saying "corrupt"
        return f"corrupt or truncated image ({err})", (0, 0)
    if min(width, height) < min_side:
        return f"image too small ({width}x{height}, minimum {min_side} px per side)", (width, height)
    return None, (width, height)


def _upright(path: Path, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) after the EXIF rotation `load_image` applies (orientations 5-8 swap them)."""
    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return size
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason)."""
    if not path.is_file():
        return None, f"missing caption file {path.name}"
    try:
        return path.read_text(encoding="utf-8").strip(), None
    except UnicodeDecodeError:
        return None, f"caption file {path.name} is not UTF-8"


class CaptionedFolder:
    """A folder of captioned images: ``ds[i] -> (image [3, size, size] float32 in [-1, 1], caption)``.

    Each image is resized (LANCZOS) so that its shorter side is ``size``, then cropped to a
    square at the centre (``crop="center"``) or at a random place (``"random"``). With
    ``buckets`` (a list of (width, height), see `buckets.bucket_shapes`) item ``i`` is instead
    scaled to cover the bucket nearest its aspect ratio, ``buckets[item_buckets[i]]``, and
    cropped to it: ``[3, height, width]``, nothing but a sliver cut away. With ``flip``
    it is mirrored left-right half of the time; with probability ``caption_dropout`` the caption
    is "" (for classifier-free guidance). With ``geometry`` an item is ``(image, caption,
    ImageGeometry)``: the original size and the crop, which SDXL is conditioned on. The random
    choices of item ``i`` come from a generator seeded by ``(seed, epoch, i)``: the same in any
    order and any worker; ``set_epoch`` changes them between epochs (call it before each epoch's
    DataLoader iterator is created).

    Bad files are skipped, logged and listed in ``skipped``, or raise with ``strict``: see the
    module docstring for the policy and for ``verify``. (Decode failures found in DataLoader
    worker processes are logged there but not added to the main process's ``skipped``.)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int = 64,
        crop: str = "center",
        flip: bool = False,
        caption_dropout: float = 0.0,
        strict: bool = False,
        seed: int = 0,
        verify: str = "full",
        min_side: int = 8,
        buckets: list[tuple[int, int]] | None = None,
        geometry: bool = False,
    ):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {list(VERIFY)}, got {verify!r}")
        if not isinstance(min_side, int) or min_side < 1:
            raise ValueError(f"min_side must be a positive int, got {min_side!r}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data folder {self.root} does not exist or is not a folder")
        self.size, self.crop, self.flip, self.caption_dropout = size, crop, flip, caption_dropout
        self.strict, self.seed, self.verify, self.min_side = strict, seed, verify, min_side
        self.epoch = 0
        self.geometry = geometry
        self.buckets = buckets
        self.item_buckets: list[int] | None = None  # with buckets: the bucket of each item
        self.skipped: list[tuple[Path, str]] = []
        self._undecodable: set[Path] = set()  # only with verify="header": found in __getitem__
        candidates = self._from_metadata() if (self.root / "metadata.jsonl").is_file() else self._from_pairs()
        self.items: list[tuple[Path, str]] = []
        sizes = []
        for path, text in candidates:
            reason, stored_size = _check_image(path, verify == "full", min_side)
            if reason is None:
                self.items.append((path, text))
                sizes.append(stored_size)
            else:
                self._skip(path, reason)
        if not self.items:
            raise ValueError(
                f"data folder {self.root} has no usable captioned images "
                f"({len(self.skipped)} skipped; see the log or .skipped)"
            )
        if buckets:
            upright = [_upright(path, size) for (path, _), size in zip(self.items, sizes, strict=True)]
            self.item_buckets = [nearest_bucket(w, h, buckets) for w, h in upright]

    def _skip(self, path: Path, reason: str) -> None:
        if self.strict:
            raise ValueError(f"bad training file {path}: {reason}")
        logger.warning("skipping %s: %s", path, reason)
        self.skipped.append((path, reason))

    def _from_pairs(self) -> list[tuple[Path, str]]:
        out = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in rel.parts):
                continue
            if not path.is_file():
                continue
            text, reason = _read_caption(path.with_suffix(".txt"))
            if reason is not None:
                self._skip(path, reason)
            else:
                out.append((path, text))
        return out

    def _from_metadata(self) -> list[tuple[Path, str]]:
        meta = self.root / "metadata.jsonl"
        out = []
        for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = Path(f"{meta}:{number}")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                self._skip(where, f"metadata line is not JSON ({err})")
                continue
            name = record.get("file_name", record.get("file")) if isinstance(record, dict) else None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(name, str) or not isinstance(text, str):
                self._skip(where, 'metadata line needs a string "file_name" (or "file") and a string "text"')
                continue
            rel = Path(os.path.normpath(name))  # lexical check: symlinks inside root may point anywhere
            path = self.root / rel
            if rel.is_absolute() or rel.parts[:1] == ("..",):
                self._skip(where, f"file {name!r} is outside the data folder")
            elif not path.is_file():
                self._skip(path, "image file listed in metadata.jsonl does not exist")
            else:
                out.append((path, text))
        return out

    def set_epoch(self, epoch: int) -> None:
        """Draw new crops, flips and caption dropouts for ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | tuple[torch.Tensor, str, ImageGeometry]:
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        index %= len(self.items)
        for attempt in range(len(self.items)):
            path, text = self.items[(index + attempt) % len(self.items)]
            if path in self._undecodable:
                continue
            try:
                image = load_image(path)
            except ValueError as err:  # decoding failed after a header-only check (or the file changed)
                self._skip(path, f"failed to decode ({err})")
                self._undecodable.add(path)
                continue
            return self._transform(image, text, index)  # the random choices stay those of `index`
        raise ValueError(f"no image in {self.root} could be decoded")

    def _transform(self, image: Image.Image, text: str, index: int) -> tuple:  # as __getitem__
        # Always draw all four numbers, so switching one option off leaves the others unchanged.
        rng = random.Random(derive_seed(self.seed, self.epoch, index))
        u_x, u_y, u_flip, u_drop = rng.random(), rng.random(), rng.random(), rng.random()
        # the target of `index` (not of a replacement item), so a batch of one bucket stays one shape
        target_w, target_h = (
            (self.size, self.size) if self.item_buckets is None else self.buckets[self.item_buckets[index]]
        )
        width, height = image.size
        scale = max(target_w / width, target_h / height)  # cover the target, then crop the excess
        new = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
        if new != image.size:
            image = image.resize(new, Image.Resampling.LANCZOS)
        if self.crop == "center":
            left, top = (new[0] - target_w) // 2, (new[1] - target_h) // 2
        else:
            left, top = int(u_x * (new[0] - target_w + 1)), int(u_y * (new[1] - target_h + 1))
        image = image.crop((left, top, left + target_w, top + target_h))
        flipped = self.flip and u_flip < 0.5
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = new[0] - target_w - left  # the crop's place in the mirrored image
        caption = "" if u_drop < self.caption_dropout else text
        if self.geometry:
            return image_to_tensor(image)[0], caption, ImageGeometry((height, width), (top, left))
        return image_to_tensor(image)[0], caption
