"""Captions of the shapes world: random templates for training, the canonical caption, the parser
that inverts them, and the fixed prompt suites of the evaluation.

A caption is always TRUE for its scene; it may leave out an object's size or cell and the
background, never a colour, a shape or (with two objects) the relation. The vocabulary below is
the whole language: every phrase maps to exactly one value, object colours never name a
background, and cell phrases ("on the left") never collide with relation phrases ("to the left
of"). So ``parse_caption`` can read every template back into a ``SceneSpec`` — the attributes a
caption asks for, ``None`` where it does not say — and ``SceneSpec.matches(scene)`` checks a scene
against it. The evaluation judge uses the same two functions on its prompts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stablediff.shapes.render import Placement
from stablediff.shapes.world import (
    BACKGROUNDS,
    CELLS,
    COLORS,
    HELD_OUT_PAIRS,
    INVERSE_RELATION,
    RELATIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    Rng,
    Scene,
    ShapeObject,
    _check,
    _choice,
    _uniform,
    true_relations,
)

# The first phrase of each tuple is the canonical one.
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),  # filled: never "ring"
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus sign"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}
CELL_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top": ("at the top", "at the top center", "in the top middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "at the bottom center", "in the bottom middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
BACKGROUND_TEMPLATES: tuple[str, ...] = ("on a {} background", "against a {} background")
PREFIXES: tuple[str, ...] = ("a picture of", "an image of", "a drawing of")
SUITES: tuple[str, ...] = ("single", "heldout", "relation")


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; ``size``/``cell`` are ``None`` when it does not say."""

    shape: str
    color: str
    size: str | None = None
    cell: str | None = None

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, list(COLORS))
        _check("size", self.size, [None, *SIZES])
        _check("cell", self.cell, [None, *CELLS])

    def matches(self, obj: ShapeObject) -> bool:
        return (
            (self.shape, self.color) == (obj.shape, obj.color)
            and self.size in (None, obj.size)
            and self.cell in (None, obj.cell)
        )


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for: background (or None), one or two ``ObjectSpec``s, and for two
    objects the relation of the first to the second. Contradictions (a relation false for the
    given cells, two objects in one cell) are refused with ``ValueError``."""

    background: str | None
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        _check("background", self.background, [None, *BACKGROUNDS])
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a spec has 1 or 2 objects, got {len(self.objects)}")
        _check("relation", self.relation, [None, *RELATIONS] if len(self.objects) == 2 else [None])
        if len(self.objects) == 2:
            a, b = self.objects
            if a.cell is not None and b.cell is not None:
                _check(
                    f"relation for cells {a.cell!r} -> {b.cell!r}",
                    self.relation,
                    [None, *true_relations(a.cell, b.cell)],
                )

    @classmethod
    def from_scene(cls, scene: Scene) -> SceneSpec:
        """The complete spec of ``scene`` (what its canonical caption says)."""
        objects = tuple(ObjectSpec(o.shape, o.color, o.size, o.cell) for o in scene.objects)
        return cls(scene.background, objects, scene.relation)

    @property
    def is_complete(self) -> bool:
        """Every attribute is given, so the spec names exactly one ``Scene``."""
        fields = [self.background] + [v for o in self.objects for v in (o.size, o.cell)]
        return None not in fields and (len(self.objects) == 1 or self.relation is not None)

    def to_scene(self) -> Scene:
        if not self.is_complete:
            raise ValueError(f"spec is not complete, so it names no single scene: {self}")
        objects = tuple(ShapeObject(o.shape, o.color, o.size, o.cell) for o in self.objects)  # type: ignore[arg-type]
        return Scene(self.background, objects, self.relation)  # type: ignore[arg-type]

    def matches(self, scene: Scene) -> bool:
        """True when ``scene`` has everything the spec asks for (objects in either order, the
        relation checked against the scene's cells, not against ``scene.relation``)."""
        if self.background not in (None, scene.background) or len(self.objects) != len(scene.objects):
            return False
        if len(self.objects) == 1:
            return self.objects[0].matches(scene.objects[0])
        for a, b in (scene.objects, scene.objects[::-1]):
            if self.objects[0].matches(a) and self.objects[1].matches(b):
                if self.relation is None or self.relation in true_relations(a.cell, b.cell):
                    return True
        return False

    def to_dict(self) -> dict[str, Any]:
        objects = [{"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell} for o in self.objects]
        return {"background": self.background, "objects": objects, "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        return cls(d.get("background"), tuple(ObjectSpec(**o) for o in d["objects"]), d.get("relation"))


# ---------------------------------------------------------------------------------------------
# Writing captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: ObjectSpec | ShapeObject, rng: Rng | None, size: bool, cell: bool) -> str:
    """``a [size] colour shape [cell phrase]``; ``rng`` picks synonyms (None: canonical words)."""
    pick = (lambda options: options[0]) if rng is None else (lambda options: _choice(rng, options))
    words = [pick(SIZE_WORDS[obj.size])] if size and obj.size is not None else []
    words += [obj.color, pick(SHAPE_WORDS[obj.shape])]
    if cell and obj.cell is not None:
        words.append(pick(CELL_PHRASES[obj.cell]))
    return f"{_article(words[0])} {' '.join(words)}"


def canonical_caption(scene: Scene | SceneSpec) -> str:
    """The caption with every attribute the scene (or spec) gives, in canonical words, e.g.
    "a small red circle in the top left corner to the left of a large blue square in the top
    right corner on a white background". ``parse_caption`` inverts it exactly."""
    phrases = [_object_phrase(scene.objects[0], None, True, True)]
    if len(scene.objects) == 2:
        if scene.relation is not None:
            phrases.append(RELATION_PHRASES[scene.relation][0])
        phrases.append(_object_phrase(scene.objects[1], None, True, True))
    if scene.background is not None:
        phrases.append(BACKGROUND_TEMPLATES[0].format(scene.background))
    return " ".join(phrases)


def caption(scene: Scene, rng: Rng, pair_cell_rate: float = 0.25) -> str:
    """A random TRUE caption of ``scene``: synonyms, either object order (with the inverse
    relation), and size (kept 70%), cell (60% for one object, ``pair_cell_rate`` each for two) and
    background (50%) sometimes left out. ``rng``: ``random.Random`` or numpy ``Generator``."""
    if not 0.0 <= pair_cell_rate <= 1.0:
        raise ValueError(f"pair_cell_rate must be in [0, 1], got {pair_cell_rate!r}")
    objects, relation = list(scene.objects), scene.relation
    if len(objects) == 2 and _uniform(rng, 0, 1) < 0.5:
        objects.reverse()
        relation = INVERSE_RELATION[relation]  # type: ignore[index]
    p_cell = 0.6 if len(objects) == 1 else pair_cell_rate
    cells = [_uniform(rng, 0, 1) < p_cell for _ in objects]
    phrases = [_object_phrase(o, rng, _uniform(rng, 0, 1) < 0.7, c) for o, c in zip(objects, cells, strict=True)]
    if relation is not None:
        # After a cell phrase, the short form would read "on the left left of": use the full one.
        options = RELATION_PHRASES[relation]
        phrases.insert(1, options[0] if cells[0] else _choice(rng, options))
    text = " ".join(phrases)
    # Background: a suffix (35%), a leading phrase (15%) or left out (50%; then 30% of those
    # captions start with "a picture of"-like prefixes, which never mix with a leading background).
    u = _uniform(rng, 0, 1)
    background = _choice(rng, BACKGROUND_TEMPLATES).format(_choice(rng, BACKGROUND_WORDS[scene.background]))
    if u < 0.35:
        return f"{text} {background}"
    if u < 0.5:
        return f"{background}, {text}"
    return f"{_choice(rng, PREFIXES)} {text}" if _uniform(rng, 0, 1) < 0.3 else text


_RELATION_SWAP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "under": "above"}
_RELATION_WORDS = re.compile(r"\b(left of|right of|above|below|under)\b")


def inverse_relation_caption(text: str) -> str | None:
    """The caption with its relation turned round in place ("left of" <-> "right of", "above" <->
    "below"/"under"), every other word kept: a FALSE caption of the scene that only the relation
    tells apart (a hard negative; where the caption names both cells too, it contradicts itself).
    None when the caption has no relation. Cell phrases never contain these words ("on the left",
    "in the lower left corner")."""
    swapped, count = _RELATION_WORDS.subn(lambda m: _RELATION_SWAP[m.group(1)], text)
    return swapped if count else None


# ---------------------------------------------------------------------------------------------
# Reading captions
def _vocabulary() -> dict[str, tuple[str, str | None]]:
    """phrase -> (kind, value) for every phrase of the language."""
    vocab: dict[str, tuple[str, str | None]] = {"a": ("article", None), "an": ("article", None)}
    vocab |= {p: ("prefix", None) for p in PREFIXES}
    vocab |= {w: ("size", k) for k, ws in SIZE_WORDS.items() for w in ws}
    vocab |= {w: ("shape", k) for k, ws in SHAPE_WORDS.items() for w in ws}
    vocab |= {c: ("color", c) for c in COLORS}
    vocab |= {p: ("cell", k) for k, ps in CELL_PHRASES.items() for p in ps}
    vocab |= {p: ("relation", k) for k, ps in RELATION_PHRASES.items() for p in ps}
    vocab |= {
        t.format(w): ("background", k) for k, ws in BACKGROUND_WORDS.items() for w in ws for t in BACKGROUND_TEMPLATES
    }
    return vocab


_VOCAB = _vocabulary()
# Longest phrases first, so "at the top left" wins over "at the top".
_TOKEN = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(_VOCAB, key=len, reverse=True)) + r")\b")


def parse_caption(text: str) -> SceneSpec:
    """Read a caption of any template back into a ``SceneSpec``.

    Case, punctuation and extra spaces are ignored. Raises ``ValueError`` naming the problem for
    words outside the language, an object without a colour or shape, a misplaced cell or
    relation, or a spec that contradicts itself.
    """
    norm = " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())
    tokens, end = [], 0
    for m in _TOKEN.finditer(norm):
        if norm[end : m.start()].strip():
            raise ValueError(f"cannot parse caption {text!r}: unknown words {norm[end : m.start()].strip()!r}")
        tokens.append(_VOCAB[m.group(1)])
        end = m.end()
    if norm[end:].strip():
        raise ValueError(f"cannot parse caption {text!r}: unknown words {norm[end:].strip()!r}")

    objects: list[dict[str, str | None]] = []
    pending: dict[str, str | None] = {}  # size/colour read, shape not yet
    relation = background = None
    for kind, value in tokens:
        if kind in ("article", "prefix"):
            continue
        if kind in ("size", "color"):
            if kind in pending:
                raise ValueError(f"cannot parse caption {text!r}: two {kind}s for one object")
            pending[kind] = value
        elif kind == "shape":
            if "color" not in pending:
                raise ValueError(f"cannot parse caption {text!r}: the {value} has no colour")
            objects.append({"shape": value, "color": pending["color"], "size": pending.get("size"), "cell": None})
            pending = {}
        elif kind == "cell":
            if not objects or pending or objects[-1]["cell"] is not None:
                raise ValueError(f"cannot parse caption {text!r}: position {value!r} does not follow an object")
            objects[-1]["cell"] = value
        elif kind == "relation":
            if len(objects) != 1 or pending or relation is not None:
                raise ValueError(f"cannot parse caption {text!r}: relation {value!r} must stand between two objects")
            relation = value
        elif background is not None:
            raise ValueError(f"cannot parse caption {text!r}: two backgrounds")
        else:
            background = value
    if pending:
        raise ValueError(f"cannot parse caption {text!r}: an object has no shape")
    if len(objects) not in (1, 2) or (len(objects) == 2) != (relation is not None):
        raise ValueError(f"cannot parse caption {text!r}: expected one object, or two joined by a relation")
    return SceneSpec(background, tuple(ObjectSpec(**o) for o in objects), relation)  # type: ignore[arg-type]


def object_word_spans(text: str) -> list[tuple[tuple[str, str], list[tuple[int, int]]]]:
    """Each object a caption names, in caption order: its (colour, shape) and the character spans
    of the words that name it (size, colour, shape; not its cell). ``text`` as ``caption`` writes
    it (lower case); a phrase outside the language raises ``ValueError``."""
    objects: list[tuple[tuple[str, str], list[tuple[int, int]]]] = []
    color, spans, end = None, [], 0
    for m in _TOKEN.finditer(text):
        if text[end : m.start()].strip(" ,"):
            raise ValueError(f"cannot read caption {text!r}: unknown words {text[end : m.start()].strip()!r}")
        end = m.end()
        kind, value = _VOCAB[m.group(1)]
        if kind in ("size", "color", "shape"):
            spans.append(m.span())
            color = value if kind == "color" else color
        if kind == "shape":
            if color is None:
                raise ValueError(f"cannot read caption {text!r}: the {value} has no colour")
            objects.append(((color, value), spans))  # type: ignore[arg-type]
            color, spans = None, []
    if text[end:].strip(" ,"):
        raise ValueError(f"cannot read caption {text!r}: unknown words {text[end:].strip()!r}")
    return objects


def caption_regions(text: str, scene: Scene, placements: Sequence[Placement], size: int) -> list[list[float]]:
    """Grounding of a caption of ``scene``: ``[start, end, x0, y0, x1, y1]`` for every word that
    names an object (``object_word_spans``), with the box the object was drawn in (``placements``
    from ``layout``), in fractions of the image side ``size``."""
    boxes = {obj.pair: p.box(size) for obj, p in zip(scene.objects, placements, strict=True)}
    regions = []
    for pair, spans in object_word_spans(text):
        if pair not in boxes:
            raise ValueError(f"caption {text!r} names a {' '.join(pair)}, which the scene does not have")
        regions += [[start, end, *boxes[pair]] for start, end in spans]
    return regions


# ---------------------------------------------------------------------------------------------
# Evaluation prompt suites
def prompt_suite(kind: str, n: int = 200, seed: int = 0) -> list[tuple[str, SceneSpec]]:
    """``n`` distinct evaluation prompts (canonical captions) with their specs, the same for the
    same (kind, n, seed).

    - "single": one held-in object, with colour, shape, size, cell and background (2268 possible);
    - "heldout": the same with a ``HELD_OUT_PAIRS`` object (324 possible);
    - "relation": two held-in objects (colour and shape) with a relation and a background, e.g.
      "a red circle to the left of a blue square on a white background" (20664 possible).
    """
    _check("kind", kind, SUITES)
    if kind == "relation":
        combos: list[tuple[Any, ...]] = [
            (a, b, r, bg) for a in TRAIN_PAIRS for b in TRAIN_PAIRS if a != b for r in RELATIONS for bg in BACKGROUNDS
        ]
    else:
        pairs = TRAIN_PAIRS if kind == "single" else sorted(HELD_OUT_PAIRS)
        combos = [(p, size, cell, bg) for p in pairs for size in SIZES for cell in CELLS for bg in BACKGROUNDS]
    if not isinstance(n, int) or not 1 <= n <= len(combos):
        raise ValueError(f"n must be an int in [1, {len(combos)}] for the {kind!r} suite, got {n!r}")
    out = []
    for combo in random.Random(seed).sample(combos, n):
        if kind == "relation":
            (c1, s1), (c2, s2), rel, bg = combo
            spec = SceneSpec(bg, (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), rel)
        else:
            (c, s), size, cell, bg = combo
            spec = SceneSpec(bg, (ObjectSpec(s, c, size, cell),))
        out.append((canonical_caption(spec), spec))
    return out
