"""The verdict: does a generated image show what its prompt asks for?

``judge(image, spec)`` reads the image with :mod:`stablediff.eval.detect` and matches every
requested object (``parse_caption(prompt)``) to what it sees, attribute by attribute: colour,
shape, size, cell, the relation between two objects, the background, and the object count.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from stablediff.eval.detect import DetectedObject, analyse
from stablediff.shapes import ObjectSpec, SceneSpec, true_relations


@dataclass(frozen=True)
class ObjectVerdict:
    """One requested object: the detection it was matched to (None: missing, then every attribute
    is wrong) and whether each attribute is right; ``None`` where the prompt does not say."""

    requested: ObjectSpec
    detected: DetectedObject | None
    color: bool
    shape: bool
    size: bool | None
    position: bool | None

    @property
    def correct(self) -> bool:
        return all(v is not False for v in (self.color, self.shape, self.size, self.position))


@dataclass(frozen=True)
class Verdict:
    """How an image follows its prompt. ``relation``/``background``: None when the prompt does not
    ask; ``count``: as many objects detected as requested (an extra object makes a two-object
    image of a one-object prompt, which is not what was asked). ``detected``: everything seen."""

    spec: SceneSpec
    objects: tuple[ObjectVerdict, ...]
    relation: bool | None
    background: bool | None
    count: bool
    detected: tuple[DetectedObject, ...]
    detected_background: str | None

    @property
    def all_correct(self) -> bool:
        return (
            all(o.correct for o in self.objects)
            and self.count
            and self.relation is not False
            and self.background is not False
        )

    def errors(self) -> list[str]:
        """What is wrong, in words ("object 1 (red circle): shape is square"), for reports."""
        out = []
        for i, o in enumerate(self.objects, 1):
            name = f"object {i} ({o.requested.color} {o.requested.shape})"
            if o.detected is None:
                out.append(f"{name}: missing")
                continue
            seen = {
                "color": o.detected.color,
                "shape": o.detected.shape,
                "size": o.detected.size,
                "position": o.detected.cell,
            }
            out += [f"{name}: {k} is {seen[k]}" for k in seen if getattr(o, k) is False]
        if self.relation is False:
            out.append(f"relation {self.spec.relation!r} does not hold")
        if self.background is False:
            out.append(f"background is {self.detected_background}")
        if not self.count:
            out.append(f"{len(self.detected)} objects seen, {len(self.objects)} asked")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: per-object attribute flags, relation, background, count, what was
        seen and the errors in words."""
        return {
            "all_correct": self.all_correct,
            "objects": [
                {
                    "color": o.color,
                    "shape": o.shape,
                    "size": o.size,
                    "position": o.position,
                    "matched": None if o.detected is None else self.detected.index(o.detected),
                }
                for o in self.objects
            ],
            "relation": self.relation,
            "background": self.background,
            "count": self.count,
            "detected_background": self.detected_background,
            "detected": [d.to_dict() for d in self.detected],
            "errors": self.errors(),
        }


def _object_verdict(req: ObjectSpec, det: DetectedObject | None) -> ObjectVerdict:
    seen = (None,) * 4 if det is None else (det.color, det.shape, det.size, det.cell)
    flags = [
        None if want is None else want == got
        for want, got in zip((req.color, req.shape, req.size, req.cell), seen, strict=True)
    ]
    return ObjectVerdict(req, det, *flags)


def _relation(spec: SceneSpec, matched: tuple[DetectedObject | None, ...]) -> bool | None:
    # The world defines relations by grid cells (true_relations), so the judge does too.
    if spec.relation is None:
        return None
    a, b = matched
    return a is not None and b is not None and spec.relation in true_relations(a.cell, b.cell)


def judge(image: Image.Image | np.ndarray, spec: SceneSpec) -> Verdict:
    """Judge ``image`` against ``spec`` (``parse_caption(prompt)``).

    Each requested object is matched to a detection sharing its colour or its shape (a detection
    sharing neither is no evidence about it: the object is missing). Among the possible matchings
    (each detection used at most once) the one with the most right attributes wins, colour first,
    then shape, then size, cell and relation; ties go to the better template fit of the requested
    shape. This is the reading most favourable to the image, as a human rater would give.
    """
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"spec must be a SceneSpec (see parse_caption), got {type(spec).__name__}")
    background, detected = analyse(image)

    def score(req: ObjectSpec, det: DetectedObject | None) -> tuple[int, float]:
        if det is None:
            return (0, 0.0)
        v = _object_verdict(req, det)
        return (8 * v.color + 4 * v.shape + (v.size is True) + (v.position is True), det.scores[req.shape])

    options: list[DetectedObject | None] = [*detected, None]
    best: tuple[Any, ...] | None = None
    for combo in itertools.product(options, repeat=len(spec.objects)):
        used = [d for d in combo if d is not None]
        if len(used) != len({id(d) for d in used}):
            continue
        scores = [score(r, d) for r, d in zip(spec.objects, combo, strict=True)]
        if any(d is not None and s[0] < 4 for d, s in zip(combo, scores, strict=True)):
            continue  # neither colour nor shape in common: not a match
        key = (sum(s[0] for s in scores) + (_relation(spec, combo) is True), sum(s[1] for s in scores))
        if best is None or key > best[0]:
            best = (key, combo)
    assert best is not None  # the all-None matching is always allowed
    combo = best[1]
    return Verdict(
        spec=spec,
        objects=tuple(_object_verdict(r, d) for r, d in zip(spec.objects, combo, strict=True)),
        relation=_relation(spec, combo),
        background=None if spec.background is None else background == spec.background,
        count=len(detected) == len(spec.objects),
        detected=detected,
        detected_background=background,
    )
