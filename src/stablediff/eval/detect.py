"""What is in a shapes-world image: its background and its objects, read back by measurement.

No learning: the world's colours, shapes, sizes and grid are known exactly (stablediff.shapes).

1. Background: the per-channel median of the border ring (objects cover little of it), named by
   the nearest ``BACKGROUNDS`` colour.
2. Segmentation: a pixel of an object is a mixture ``B + alpha * (C - B)`` of the background ``B``
   and the object colour ``C`` (anti-aliasing and blur only mix along that segment). Each pixel is
   projected on the segment of every palette colour; it belongs to the colour with the smallest
   residual, and is a "core" pixel where that colour's ``alpha >= 0.5``. Projecting on segments,
   not taking the nearest palette colour, keeps a half-covered red pixel on white from reading as
   pink.
3. Objects: 8-connected components of the core pixels of each colour. Each pixel near objects
   belongs to the nearest one (its territory). A small component that touches a larger one and
   fits no shape is a colour fringe of it and merges into it; specks lighter than a fraction of
   the smallest object are dropped.
4. Measures: with the object's own colour (robust to colour shifts) its soft mask ``alpha`` over
   its territory gives mass and centroid, both unchanged by blur and unbiased under noise. For
   each shape the mass gives the radius and the centroid the centre, and a template rendered like
   the world renders (same PIL rasteriser, 4x supersampling) is compared with the mask by soft
   IoU, also after Gaussian blurs of the template so that soft images are matched fairly. Best
   IoU -> shape; its radius -> size (threshold: the geometric mean of the two sizes); its centre
   -> cell.

Images larger than ``MAX_SIDE`` are box-filtered down first: the world has nothing finer to see.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from stablediff.shapes import BACKGROUNDS, CELLS, COLORS, OUTLINES, SHAPES, SIZES
from stablediff.shapes.render import SUPERSAMPLE  # templates rasterise exactly like the world's images

MAX_SIDE = 128
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])  # radius / side between the classes
MIN_MASS = 0.3  # of the smallest object's area (a small triangle): less is a speck, not an object
MAX_RESIDUAL = 55.0  # RGB distance off a colour's segment still counted as that colour (0-255)
MAX_BACKGROUND_DISTANCE = 60.0  # border median further than this from every background: none
TEMPLATE_BLURS = (0.0, 0.6, 1.0, 1.4)  # Gaussian sigmas in pixels of a 64 px image
FRINGE_IOU = 0.45  # a component touching a larger object and fitting no shape better: a fringe
MAX_OBJECTS = 8  # the largest components kept; more than that is not a shapes image anyway

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (8, 3)
_COLOR_NAMES = tuple(COLORS)


@dataclass(frozen=True)
class DetectedObject:
    """One object as the judge sees it. ``center`` (x, y) and ``radius`` (the shape's half-extent,
    as ``SIZES``) are fractions of the image side, ``area`` a fraction of the image area;
    ``scores`` is the template IoU of every shape, ``shape`` the best of them."""

    color: str
    shape: str
    size: str
    cell: str
    center: tuple[float, float]
    radius: float
    area: float
    scores: dict[str, float] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "cell": self.cell,
            "center": [round(v, 4) for v in self.center],
            "radius": round(self.radius, 4),
            "area": round(self.area, 5),
            "scores": {k: round(v, 3) for k, v in self.scores.items()},
        }

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape} at {self.cell}"


# ---------------------------------------------------------------------------------------------
# Templates
def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in OUTLINES[shape]], fill=255)


def _template(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` (centre/half-extent in pixels) on an ``h`` x ``w`` grid."""
    big = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    _draw(ImageDraw.Draw(big), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE)
    return np.asarray(big.resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255.0


@functools.cache
def _calibration(shape: str) -> tuple[float, float, float, float]:
    """(A, P, gx, gy): a rendered shape of half-extent r px has area ``A r^2 + P r`` px and its
    centroid at ``(gx, gy) * r`` from its centre. Measured on renders rather than taken from the
    outline, so the rasteriser's bias (it fills boundary pixels) cancels out."""
    rows = []
    for r in (4.0, 7.0, 11.0):
        for off in (0.0, 0.37, 0.71):
            side = int(2 * r + 8)
            c = side / 2 + off
            t = _template(shape, c, c, r, side, side)
            ys, xs = np.mgrid[:side, :side] + 0.5
            m = t.sum()
            rows.append((r, m, ((t * xs).sum() / m - c) / r, ((t * ys).sum() / m - c) / r))
    r, m, gx, gy = map(np.array, zip(*rows, strict=True))
    a, p = np.linalg.lstsq(np.stack([r * r, r], 1), m, rcond=None)[0]
    return float(a), float(p), float(gx.mean()), float(gy.mean())


def _radius(shape: str, mass: float) -> float:
    a, p, _, _ = _calibration(shape)
    return (-p + math.sqrt(p * p + 4 * a * max(mass, 0.0))) / (2 * a)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, zero outside ``x`` (a template is zero at its crop's edge).
    Shifted sums rather than a matrix product: BLAS may thread small products, which stalls on a
    busy machine."""
    if sigma <= 0:
        return x
    radius = math.ceil(3 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w = x.shape
    p = np.pad(x, radius)
    rows = sum(t * p[i : i + h, :] for i, t in enumerate(taps))
    return sum(t * rows[:, i : i + w] for i, t in enumerate(taps))


# ---------------------------------------------------------------------------------------------
# Segmentation
def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB float64 in [0, 255], square, at most ``MAX_SIDE`` px."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"image array must be (H, W, 3) or (H, W, 4), got shape {image.shape}")
        arr = image[..., :3]
        if np.issubdtype(arr.dtype, np.floating):  # float images are in [0, 1]
            arr = np.clip(arr * 255.0, 0, 255)
        image = Image.fromarray(np.asarray(np.round(arr), dtype=np.uint8), "RGB")
    else:
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    w, h = image.size
    if w != h or w < 16:
        raise ValueError(f"the shapes world is square, at least 16 px: got {w}x{h}")
    if w > MAX_SIDE:
        image = image.resize((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _background(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    ring = max(1, img.shape[0] // 32)
    border = np.concatenate(
        [
            img[:ring].reshape(-1, 3),
            img[-ring:].reshape(-1, 3),
            img[:, :ring].reshape(-1, 3),
            img[:, -ring:].reshape(-1, 3),
        ]
    )
    b = np.median(border, axis=0)
    dist = {name: float(np.linalg.norm(b - rgb)) for name, rgb in BACKGROUNDS.items()}
    name = min(dist, key=dist.__getitem__)
    return b, (name if dist[name] <= MAX_BACKGROUND_DISTANCE else None)


def _project(p: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unclipped alpha of ``p`` (..., 3, background subtracted) along ``d`` (3,) and the distance
    from the clipped segment point."""
    alpha = p @ d / float(d @ d)
    residual = np.linalg.norm(p - np.clip(alpha, 0, 1)[..., None] * d, axis=-1)
    return alpha, residual


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` dilated by ``steps`` pixels (4-neighbourhood)."""
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as boolean masks: min-label propagation with
    pointer jumping (no scipy; the masks are at most 128 x 128)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = lab
        for dy in range(3):
            for dx in range(3):
                new = np.minimum(new, p[dy : dy + h, dx : dx + w])
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        new = flat[new]  # jump to the label of the pixel one points at
        if np.array_equal(new, lab):
            break
        lab = new
    return [lab == v for v in np.unique(lab[mask])]


def _territories(cores: list[np.ndarray], steps: int) -> np.ndarray:
    """Index of the nearest core (in 4-connected steps, at most ``steps``) per pixel, -1 beyond:
    every pixel near an object belongs to one object only."""
    terr = np.full(cores[0].shape, -1) if cores else np.full((1, 1), -1)
    for i, c in enumerate(cores):
        terr[c] = i
    for _ in range(steps):
        p = np.pad(terr, 1, constant_values=-1)
        new = terr
        for shifted in (p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]):
            new = np.where((new < 0) & (shifted >= 0), shifted, new)
        terr = new
    return terr


def _pad(side: int) -> int:
    # A blurred edge reaches 3 sigma beyond the core; 2 px more for the anti-aliased rim.
    return math.ceil(2 + 3 * TEMPLATE_BLURS[-1] * side / 64)


def _measure(img: np.ndarray, b: np.ndarray, k: int, own: np.ndarray, region: np.ndarray) -> DetectedObject | None:
    """Colour, shape, size and cell of one object of palette colour ``k``: ``own`` its core
    pixels of that colour, ``region`` the pixels that may belong to it (its territory)."""
    side = img.shape[0]
    p = img - b
    alpha_palette, _ = _project(p[own], _PALETTE[k] - b)
    top = np.argsort(alpha_palette)[-max(3, math.ceil(0.3 * alpha_palette.size)) :]
    d = p[own][top].mean(axis=0)  # this object's own colour, background subtracted
    if float(d @ d) < 30.0**2:
        return None
    scale = side / 64
    alpha, _ = _project(p, d)
    alpha = np.where(region, alpha, 0.0)
    mass = float(alpha.sum())
    min_mass = MIN_MASS * _calibration("triangle")[0] * (SIZES["small"] * side) ** 2
    if mass < min_mass:
        return None
    ys, xs = np.mgrid[:side, :side] + 0.5
    mx, my = float((alpha * xs).sum() / mass), float((alpha * ys).sum() / mass)
    soft = np.clip(alpha, 0, 1)
    # Crop around the object: templates are rendered on the crop only.
    half = math.ceil(1.6 * math.sqrt(mass) + 3 * TEMPLATE_BLURS[-1] * scale + 2)
    x0, y0 = max(0, int(mx) - half), max(0, int(my) - half)
    x1, y1 = min(side, int(mx) + half + 1), min(side, int(my) + half + 1)
    crop = soft[y0:y1, x0:x1]
    scores, fits = {}, {}
    for shape in SHAPES:
        r = _radius(shape, mass)
        _, _, gx, gy = _calibration(shape)
        cx, cy = mx - gx * r, my - gy * r
        t = _template(shape, cx - x0, cy - y0, r, y1 - y0, x1 - x0)
        best = 0.0
        for sigma in TEMPLATE_BLURS:
            tb = _blur(t, sigma * scale)
            best = max(best, float(np.minimum(crop, tb).sum() / np.maximum(crop, tb).sum()))
        scores[shape], fits[shape] = best, (cx, cy, r)
    shape = max(scores, key=scores.__getitem__)
    cx, cy, r = fits[shape]
    col, row = min(2, max(0, int(3 * cx / side))), min(2, max(0, int(3 * cy / side)))
    return DetectedObject(
        color=_COLOR_NAMES[k],
        shape=shape,
        size="large" if r / side > SIZE_THRESHOLD else "small",
        cell=CELLS[3 * row + col],
        center=(cx / side, cy / side),
        radius=r / side,
        area=mass / side**2,
        scores=scores,
    )


def analyse(image: Image.Image | np.ndarray) -> tuple[str | None, tuple[DetectedObject, ...]]:
    """(background name or None when the border matches none, detected objects by decreasing
    area). ``image``: PIL image or (H, W, 3) array, uint8 in [0, 255] or float in [0, 1]."""
    img = _to_array(image)
    b, background = _background(img)
    p = img - b
    alpha = np.zeros((*img.shape[:2], len(_PALETTE)))
    residual = np.full_like(alpha, np.inf)  # (H, W, 8)
    for k, c in enumerate(_PALETTE):
        if np.linalg.norm(c - b) >= 30.0:  # a colour (nearly) equal to the background is unseen
            alpha[..., k], residual[..., k] = _project(p, c - b)
    residual = np.where(alpha >= 0.25, residual, np.inf)
    label = residual.argmin(-1)
    claimed = np.take_along_axis(residual, label[..., None], -1)[..., 0] <= MAX_RESIDUAL
    core = claimed & (np.take_along_axis(alpha, label[..., None], -1)[..., 0] >= 0.5)
    found = [(int(k), c) for k in np.unique(label[core]) for c in _components(core & (label == k))]
    found = sorted(found, key=lambda kc: -int(kc[1].sum()))[:MAX_OBJECTS]
    masks = [c for _, c in found]  # cores; a fringe's core is merged into its object's below
    merged = True
    while merged:
        terr = _territories(masks, _pad(img.shape[0]))
        objects = [
            _measure(img, b, k, own & m, terr == i) if m.any() else None
            for i, ((k, own), m) in enumerate(zip(found, masks, strict=True))
        ]
        # A colour fringe: where blur, noise, compression or a colour shift meet at an object's
        # edge, mixtures with the background can sit closer to another colour's segment. Such a
        # component touches a larger object and is too small or fits no shape: it is part of
        # that object (objects of the world never touch).
        merged = False
        for i in reversed(range(len(masks))):  # smallest first
            obj, m = objects[i], masks[i]
            if not m.any() or (obj is not None and max(obj.scores.values()) >= FRINGE_IOU):
                continue
            near = _grow(m, 1)
            hosts = [j for j in range(i) if masks[j].any() and (near & masks[j]).any()]
            if hosts:
                masks[hosts[0]] = masks[hosts[0]] | m
                masks[i] = np.zeros_like(m)
                merged = True
    objects = [o for o in objects if o is not None]
    objects.sort(key=lambda o: -o.area)
    return background, tuple(objects)


def describe(image: Image.Image | np.ndarray) -> list[DetectedObject]:
    """What the judge sees in ``image``, without a prompt: objects by decreasing area."""
    return list(analyse(image)[1])
