"""Seeded datasets of the shapes world: ``ShapesDataset``, its captions alone, and captioned folders.

Everything is deterministic from a seed: ``ShapesDataset`` derives each item's generators from
(seed, split, index, purpose), so any item can be regenerated alone.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from stablediff.seeds import derive_seed
from stablediff.shapes.captions import caption
from stablediff.shapes.render import Placement, layout, render
from stablediff.shapes.world import SPLITS, Scene, _check, sample_scene


class ShapesDataset:
    """``n`` scenes of one split, as a map-style dataset: ``ds[i] -> (image, caption, scene)``.

    ``image`` is a PIL RGB image (or ``transform(image)``), ``caption`` a random-template caption
    (see :func:`stablediff.shapes.captions.caption`), ``scene`` the ``Scene``. Item ``i`` uses generators seeded from
    ``(seed, split, i)`` only, so it is the same whether read alone, in order or in any order.
    The ``Scene`` does not go through torch's default collate: for a DataLoader, write the items
    with ``write_shapes_folder`` and read them with ``CaptionedFolder``, or pass a ``collate_fn``.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        split: str = "train",
        size: int = 64,
        transform: Callable[[Image.Image], Any] | None = None,
        n_objects: int | None = None,
    ):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        _check("split", split, SPLITS)
        _check("n_objects", n_objects, (None, 1, 2))
        self.n, self.seed, self.split, self.size = n, seed, split, size
        self.transform, self.n_objects = transform, n_objects

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        rng = random.Random(derive_seed(self.seed, self.split, index, "scene"))
        return sample_scene(rng, self.split, self.n_objects)

    def placements(self, index: int) -> tuple[Placement, ...]:
        """Where item ``index``'s objects are drawn (the jitter of its image)."""
        return layout(self.scene(index), self.size, random.Random(derive_seed(self.seed, self.split, index, "jitter")))

    def __getitem__(self, index: int) -> tuple[Any, str, Scene]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        index %= self.n
        scene = self.scene(index)
        image = render(scene, self.size, random.Random(derive_seed(self.seed, self.split, index, "jitter")))
        text = caption(scene, random.Random(derive_seed(self.seed, self.split, index, "caption")))
        return (self.transform(image) if self.transform else image), text, scene


def _atomic_write(path: Path, data: bytes) -> None:
    # Temp name in the same folder + rename: a reader never sees half a file. No fsync per
    # file (it would dominate the time for 50k small files); the folder is regenerable.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shapes_folder(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    split: str = "train",
    size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` items of ``ShapesDataset(n, seed, split, size)`` as a captioned folder.

    Files: ``00000.png`` + ``00000.txt`` (the caption) per item, and ``metadata.jsonl`` with one
    ``{"file_name", "text", "scene"}`` object per line, written last. Every file is written under
    a temporary name and renamed. Existing files of the same names are replaced; since readers
    take ``metadata.jsonl`` as the list of items, files left from an earlier, larger run in the
    same folder are not read. ``progress(done, total)`` is called after each item. Returns the
    folder.
    """
    dataset = ShapesDataset(n, seed, split, size)  # validates the arguments before any write
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    lines = []
    for i in range(n):
        image, text, scene = dataset[i]
        name = f"{i:0{width}d}"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        _atomic_write(out / f"{name}.png", buffer.getvalue())
        _atomic_write(out / f"{name}.txt", text.encode("utf-8"))
        lines.append(json.dumps({"file_name": f"{name}.png", "text": text, "scene": scene.to_dict()}))
        if progress is not None:
            progress(i + 1, n)
    _atomic_write(out / "metadata.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    return out


def shapes_captions(n: int, seed: int, split: str = "train") -> Iterator[str]:
    """The captions of `ShapesDataset(n, seed, split)` items 0..n-1, without drawing the images.

    Uses the same per-item generators as `ShapesDataset.__getitem__` (scene, then caption seeded
    by (seed, split, index, "caption")), so `shapes_captions(n, s)` lists `ds[i][1]` exactly.
    """
    dataset = ShapesDataset(n, seed, split)
    for index in range(n):
        yield caption(dataset.scene(index), random.Random(derive_seed(seed, split, index, "caption")))
