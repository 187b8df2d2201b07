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

``sample_scene`` takes a ``random.Random`` or a numpy ``Generator``, so a scene is deterministic
from a seed. Drawing a scene is :mod:`stablediff.shapes.render`; captions are
:mod:`stablediff.shapes.captions`; seeded datasets and folders :mod:`stablediff.shapes.dataset`.

Pure Python + numpy: no torch, so an evaluation judge can import the world cheaply.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
# The 3x3 grid, row by row (kept in that layout: formatting would put one cell per line).
# fmt: off
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# fmt: on
CELL_ROWCOL: dict[str, tuple[int, int]] = {cell: divmod(i, 3) for i, cell in enumerate(CELLS)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Each colour and each shape at most once: the held-out test asks for unseen *combinations* of
# attributes that were all seen separately.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "heart"),
        ("blue", "triangle"),
        ("yellow", "cross"),
        ("purple", "circle"),
        ("orange", "square"),
    }
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
SPLITS: tuple[str, ...] = ("train", "heldout")


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
