"""The procedural "shapes" world: coloured shapes on a plain background, with true captions.

The project trains its own small text-to-image model on this world and later judges generated
images against their prompts, so everything that defines the world is an importable constant:

- background: ``BACKGROUNDS`` (white, black, gray);
- one or two objects, each a ``ShapeObject(shape, color, size, cell)``: ``SHAPES`` x ``COLORS``
  (exact RGB values, far from each other and from every background), ``SIZES`` (the shape's
  half-extent as a fraction of the image side) and ``CELLS`` (a 3x3 grid, row-major);
- two objects sit in distinct cells, have distinct (colour, shape) pairs, and the scene records
  one ``relation`` of the first to the second that is true for their cells;
- ``HELD_OUT_PAIRS``: six (colour, shape) pairs that never appear in a "train" scene; every
  "heldout" scene contains at least one.

Everything is deterministic from a seed: ``sample_scene`` takes a ``random.Random`` or a numpy
``Generator``; ``ShapesDataset`` derives each item's generators from (seed, split, index), so any
item can be regenerated alone. Captions (random templates, ``canonical_caption``, ``parse_caption``,
prompt suites) live in :mod:`stablediff.train.captions`; the names are re-exported here.

Pure Python + PIL + numpy: no torch, so an evaluation judge can import the world cheaply.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

Rng = random.Random | np.random.Generator

# Backgrounds are achromatic; every object colour is saturated, so none can pass for a background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
# Chosen so that every pair is >= 100 apart in RGB and every colour >= 100 from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (250, 230, 40),
    "purple": (150, 50, 200),
    "orange": (245, 130, 20),
    "cyan": (40, 205, 225),
    "pink": (245, 130, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
# Half-extent of a shape's bounding box as a fraction of the image side (64 px: 5.1 and 9.0 px).
# A grid cell is 1/3 of the side, so two large shapes in adjacent cells never touch, even with
# the full jitter (2 * 0.14 + 2 * JITTER < 1/3), and a corner shape stays inside the image.
SIZES: dict[str, float] = {"small": 0.08, "large": 0.14}
JITTER = 0.025  # maximal offset of a shape's centre from its cell centre, per axis, fraction of side
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CELL_ROWCOL: dict[str, tuple[int, int]] = {cell: divmod(i, 3) for i, cell in enumerate(CELLS)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Each colour and each shape at most once: the held-out test asks for unseen *combinations* of
# attributes that were all seen separately.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("green", "heart"), ("blue", "triangle"),
    ("yellow", "cross"), ("purple", "circle"), ("orange", "square"),
})  # fmt: skip
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
SPLITS: tuple[str, ...] = ("train", "heldout")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: exact area anti-aliasing


def _check(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def true_relations(cell_a: str, cell_b: str) -> tuple[str, ...]:
    """The relations from ``RELATIONS`` that hold for an object in ``cell_a`` relative to one in
    ``cell_b`` (two for diagonal cells, one otherwise, none for the same cell)."""
    (ra, ca), (rb, cb) = CELL_ROWCOL[cell_a], CELL_ROWCOL[cell_b]
    out = []
    if ca != cb:
        out.append("left of" if ca < cb else "right of")
    if ra != rb:
        out.append("above" if ra < rb else "below")
    return tuple(out)


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape: ``shape`` in SHAPES, ``color`` in COLORS, ``size`` in SIZES, ``cell`` in CELLS."""

    shape: str
    color: str
    size: str
    cell: str

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, list(COLORS))
        _check("size", self.size, list(SIZES))
        _check("cell", self.cell, CELLS)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects. ``relation`` (two objects only) is a relation of
    ``objects[0]`` to ``objects[1]`` that is true for their cells; ``None`` for one object."""

    background: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        _check("background", self.background, list(BACKGROUNDS))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 1:
            if self.relation is not None:
                raise ValueError(f"a one-object scene has no relation, got {self.relation!r}")
            return
        a, b = self.objects
        if a.cell == b.cell or a.pair == b.pair:
            raise ValueError(f"two objects need distinct cells and (colour, shape) pairs: {a}, {b}")
        _check(f"relation for cells {a.cell!r} -> {b.cell!r}", self.relation, true_relations(a.cell, b.cell))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (used in ``metadata.jsonl``); ``Scene.from_dict`` inverts it."""
        objects = [{"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell} for o in self.objects]
        return {"background": self.background, "objects": objects, "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(d["background"], tuple(ShapeObject(**o) for o in d["objects"]), d.get("relation"))


# ---------------------------------------------------------------------------------------------
# Sampling
def _check_rng(rng: object) -> None:
    if not isinstance(rng, (random.Random, np.random.Generator)):
        raise TypeError(f"rng must be a random.Random or a numpy Generator, got {type(rng).__name__}")


def _randbelow(rng: Rng, n: int) -> int:
    _check_rng(rng)
    return rng.randrange(n) if isinstance(rng, random.Random) else int(rng.integers(n))


def _choice(rng: Rng, seq: Sequence[Any]) -> Any:
    return seq[_randbelow(rng, len(seq))]


def _uniform(rng: Rng, lo: float, hi: float) -> float:
    _check_rng(rng)
    return lo + (hi - lo) * float(rng.random())


def sample_scene(rng: Rng, split: str = "train", n_objects: int | None = None) -> Scene:
    """A random scene. ``split="train"``: no object is a held-out pair; ``"heldout"``: at least one
    is. ``n_objects``: 1, 2 or None (either, equally likely). Cells, sizes, backgrounds uniform."""
    _check("split", split, SPLITS)
    _check("n_objects", n_objects, (None, 1, 2))
    background = _choice(rng, list(BACKGROUNDS))
    n = n_objects if n_objects is not None else 1 + _randbelow(rng, 2)
    if split == "train":
        pairs = [_choice(rng, TRAIN_PAIRS)]
        if n == 2:
            pairs.append(_choice(rng, [p for p in TRAIN_PAIRS if p != pairs[0]]))
    else:  # one held-out pair; a second object may be any other pair, held-out or not
        pairs = [_choice(rng, sorted(HELD_OUT_PAIRS))]
        if n == 2:
            pairs.append(_choice(rng, [p for p in ALL_PAIRS if p != pairs[0]]))
            if _randbelow(rng, 2):  # the held-out object is not always the first one
                pairs.reverse()
    cells = [_choice(rng, CELLS)]
    if n == 2:
        cells.append(_choice(rng, [c for c in CELLS if c != cells[0]]))
    objects = tuple(
        ShapeObject(shape=s, color=c, size=_choice(rng, list(SIZES)), cell=cell)
        for (c, s), cell in zip(pairs, cells, strict=True)
    )
    relation = _choice(rng, true_relations(cells[0], cells[1])) if n == 2 else None
    return Scene(background, objects, relation)


# ---------------------------------------------------------------------------------------------
# Rendering
def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    # Inner radius 0.45 (a regular pentagram has 0.38): fatter arms stay visible at 64 px.
    out = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points  # first point straight up
        out.append((radius * math.cos(angle), radius * math.sin(angle)))
    return out


def _heart(n: int = 96) -> list[tuple[float, float]]:
    # The classic parametric heart, y flipped to image coordinates and fitted into [-1, 1]^2.
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y - (y.max() + y.min()) / 2
    scale = max(np.abs(x).max(), np.abs(y).max())
    return [(float(a), float(b)) for a, b in zip(x / scale, y / scale, strict=True)]


_W = 0.32  # half-width of a cross's arms: thick enough to read as a plus sign at small size
# Outlines in unit coordinates: the shape's bounding box is within [-1, 1]^2, y points down.
OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -0.95), (1.0, 0.85), (-1.0, 0.85)],  # pointing up
    "star": _star(),
    "heart": _heart(),
    "cross": [(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W),
              (_W, 1), (-_W, 1), (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)],
}  # fmt: skip
# A point well inside each shape, in unit coordinates (the triangle's centroid is below centre).
ANCHORS: dict[str, tuple[float, float]] = {s: (0.0, 0.0) for s in SHAPES} | {"triangle": (0.0, 0.25)}


@dataclass(frozen=True)
class Placement:
    """Where an object was drawn, in pixels of the output image (``[0, size]`` along each axis):
    centre ``(cx, cy)``, half-extent ``radius``, and ``anchor``, a point inside the filled shape."""

    cx: float
    cy: float
    radius: float
    anchor: tuple[float, float]

    def box(self, size: int) -> list[float]:
        """The bounding box [x0, y0, x1, y1] in fractions of the image side ``size``."""
        return [(self.cx - self.radius) / size, (self.cy - self.radius) / size,
                (self.cx + self.radius) / size, (self.cy + self.radius) / size]  # fmt: skip


def layout(scene: Scene, size: int = 64, jitter_rng: Rng | None = None) -> tuple[Placement, ...]:
    """Object placements: cell centre plus a uniform jitter of up to ``JITTER * size`` per axis
    drawn from ``jitter_rng`` (None: no jitter). ``render`` with an equal generator uses these."""
    out = []
    for obj in scene.objects:
        row, col = CELL_ROWCOL[obj.cell]
        cx, cy = (col + 0.5) * size / 3, (row + 0.5) * size / 3
        if jitter_rng is not None:
            cx += _uniform(jitter_rng, -JITTER, JITTER) * size
            cy += _uniform(jitter_rng, -JITTER, JITTER) * size
        r = SIZES[obj.size] * size
        ax, ay = ANCHORS[obj.shape]
        out.append(Placement(cx, cy, r, (cx + ax * r, cy + ay * r)))
    return tuple(out)


def render(scene: Scene, size: int = 64, jitter_rng: Rng | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (see ``layout`` for the jitter).

    Shapes are drawn at ``SUPERSAMPLE`` times the size and box-filtered down, so edges are
    anti-aliased by exact area coverage and interiors keep the exact ``COLORS`` value.
    """
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj, p in zip(scene.objects, layout(scene, size, jitter_rng), strict=True):
        fill = COLORS[obj.color]
        cx, cy, r = p.cx * SUPERSAMPLE, p.cy * SUPERSAMPLE, p.radius * SUPERSAMPLE
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx + x * r, cy + y * r) for x, y in OUTLINES[obj.shape]], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Datasets and folders
def item_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed from ``seed`` and any labels (split, index, purpose): stable across runs and
    platforms (a hash of their text), so one item's generators never depend on other items."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ShapesDataset:
    """``n`` scenes of one split, as a map-style dataset: ``ds[i] -> (image, caption, scene)``.

    ``image`` is a PIL RGB image (or ``transform(image)``), ``caption`` a random-template caption
    (see :func:`caption`), ``scene`` the ``Scene``. Item ``i`` uses generators seeded from
    ``(seed, split, i)`` only, so it is the same whether read alone, in order or in any order.
    The ``Scene`` does not go through torch's default collate: for a DataLoader, write the items
    with ``write_shapes_folder`` and read them with ``CaptionedFolder``, or pass a ``collate_fn``.
    """

    def __init__(self, n: int, seed: int = 0, split: str = "train", size: int = 64,
                 transform: Callable[[Image.Image], Any] | None = None, n_objects: int | None = None):
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
        return sample_scene(random.Random(item_seed(self.seed, self.split, index, "scene")), self.split, self.n_objects)

    def placements(self, index: int) -> tuple[Placement, ...]:
        """Where item ``index``'s objects are drawn (the jitter of its image)."""
        return layout(self.scene(index), self.size, random.Random(item_seed(self.seed, self.split, index, "jitter")))

    def __getitem__(self, index: int) -> tuple[Any, str, Scene]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        index %= self.n
        scene = self.scene(index)
        image = render(scene, self.size, random.Random(item_seed(self.seed, self.split, index, "jitter")))
        from stablediff.train.captions import caption  # lazy: captions imports this module

        text = caption(scene, random.Random(item_seed(self.seed, self.split, index, "caption")))
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


def write_shapes_folder(out_dir: str | os.PathLike[str], n: int, seed: int = 0, split: str = "train",
                        size: int = 64, progress: Callable[[int, int], None] | None = None) -> Path:
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


# Captions are a concept of their own (stablediff.train.captions, which imports this module);
# its public names are served from here lazily (PEP 562) so that the world is one import.
if TYPE_CHECKING:  # for type checkers and linters; at run time __getattr__ serves them
    from stablediff.train.captions import (
        ObjectSpec,
        SceneSpec,
        canonical_caption,
        caption,
        parse_caption,
        prompt_suite,
    )

_CAPTION_NAMES = ("ObjectSpec", "SceneSpec", "canonical_caption", "caption", "parse_caption", "prompt_suite")


def __getattr__(name: str) -> Any:
    if name in _CAPTION_NAMES:
        from stablediff.train import captions

        return getattr(captions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALL_PAIRS", "ANCHORS", "BACKGROUNDS", "CELLS", "CELL_ROWCOL", "COLORS", "HELD_OUT_PAIRS",
    "INVERSE_RELATION", "JITTER", "RELATIONS", "SHAPES", "SIZES", "SPLITS", "TRAIN_PAIRS",
    "ObjectSpec", "Placement", "Scene", "SceneSpec", "ShapeObject", "ShapesDataset",
    "canonical_caption", "caption", "item_seed", "layout", "parse_caption", "prompt_suite",
    "render", "sample_scene", "true_relations", "write_shapes_folder",
]  # fmt: skip
