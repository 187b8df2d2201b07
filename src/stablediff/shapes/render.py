"""Drawing a scene of the shapes world: where each object goes (``layout``) and the image (``render``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stablediff.shapes.world import BACKGROUNDS, CELL_ROWCOL, COLORS, JITTER, SHAPES, SIZES, Rng, Scene, _uniform

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: exact area anti-aliasing


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
    "cross": [
        (-_W, -1),
        (_W, -1),
        (_W, -_W),
        (1, -_W),
        (1, _W),
        (_W, _W),
        (_W, 1),
        (-_W, 1),
        (-_W, _W),
        (-1, _W),
        (-1, -_W),
        (-_W, -_W),
    ],
}
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
        return [
            (self.cx - self.radius) / size,
            (self.cy - self.radius) / size,
            (self.cx + self.radius) / size,
            (self.cy + self.radius) / size,
        ]


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
