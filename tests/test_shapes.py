"""The shapes world: determinism, held-out pairs, true captions, the parser, rendering, folders, suites."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from stablediff.image import image_to_tensor
from stablediff.shapes import (
    BACKGROUNDS,
    CELL_ROWCOL,
    CELLS,
    COLORS,
    HELD_OUT_PAIRS,
    INVERSE_RELATION,
    JITTER,
    SHAPES,
    ObjectSpec,
    Scene,
    SceneSpec,
    ShapeObject,
    ShapesDataset,
    canonical_caption,
    caption,
    layout,
    parse_caption,
    prompt_suite,
    render,
    sample_scene,
    true_relations,
    write_shapes_folder,
)
from stablediff.shapes import captions as cap
from stablediff.train.data import CaptionedFolder


def _scenes(n: int, seed: int = 0, split: str = "train") -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def test_world_constants_are_well_separated():
    assert len(COLORS) == 8 and len(SHAPES) == 6 and len(CELLS) == 9
    for a, b in itertools.combinations(COLORS.values(), 2):
        assert math.dist(a, b) >= 100
    for c in COLORS.values():
        for bg in BACKGROUNDS.values():
            assert math.dist(c, bg) >= 100
    # each colour and each shape at most once among the held-out pairs
    assert len(HELD_OUT_PAIRS) == 6
    assert len({c for c, _ in HELD_OUT_PAIRS}) == 6 and len({s for _, s in HELD_OUT_PAIRS}) == 6


def test_dataset_is_deterministic_per_index():
    a, b = ShapesDataset(12, seed=5), ShapesDataset(12, seed=5)
    sweep = [a[i] for i in range(12)]
    for i in reversed(range(12)):  # other order, other instance
        img, text, scene = b[i]
        assert np.array_equal(np.asarray(img), np.asarray(sweep[i][0]))
        assert (text, scene) == sweep[i][1:]
    alone = ShapesDataset(12, seed=5)[7]
    assert np.array_equal(np.asarray(alone[0]), np.asarray(sweep[7][0])) and alone[1:] == sweep[7][1:]
    other = ShapesDataset(12, seed=6)
    assert [other[i][1] for i in range(12)] != [s[1] for s in sweep]
    with pytest.raises(IndexError):
        a[12]


def test_numpy_generator_is_accepted():
    s1 = sample_scene(np.random.default_rng(3), "train")
    s2 = sample_scene(np.random.default_rng(3), "train")
    assert s1 == s2
    assert caption(s1, np.random.default_rng(1)) == caption(s1, np.random.default_rng(1))
    with pytest.raises(TypeError, match="random.Random or a numpy Generator"):
        sample_scene(42)  # type: ignore[arg-type]


def test_held_out_pairs_never_in_train_always_in_heldout():
    train = _scenes(5000, seed=1, split="train")
    assert not any(o.pair in HELD_OUT_PAIRS for s in train for o in s.objects)
    assert {len(s.objects) for s in train} == {1, 2}
    heldout = _scenes(2000, seed=2, split="heldout")
    assert all(any(o.pair in HELD_OUT_PAIRS for o in s.objects) for s in heldout)
    assert {o.pair for s in heldout for o in s.objects} >= HELD_OUT_PAIRS


def test_relations_are_true_for_the_cells():
    for scene in _scenes(2000, seed=3):
        if len(scene.objects) == 2:
            a, b = scene.objects
            (ra, ca), (rb, cb) = CELL_ROWCOL[a.cell], CELL_ROWCOL[b.cell]
            truth = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}
            assert truth[scene.relation]
    assert true_relations("top left", "bottom right") == ("left of", "above")
    assert true_relations("center", "top") == ("below",)


def test_scene_validation():
    red_circle = ShapeObject("circle", "red", "small", "left")
    with pytest.raises(ValueError, match="color must be one of"):
        ShapeObject("circle", "white", "small", "left")
    with pytest.raises(ValueError, match="distinct cells"):
        Scene("white", (red_circle, ShapeObject("star", "blue", "large", "left")), "left of")
    with pytest.raises(ValueError, match="relation for cells"):
        Scene("white", (red_circle, ShapeObject("star", "blue", "large", "right")), "right of")
    with pytest.raises(ValueError, match="no relation"):
        Scene("white", (red_circle,), "above")
    scene = Scene("gray", (red_circle, ShapeObject("star", "blue", "large", "right")), "left of")
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_canonical_caption_round_trip():
    assert (
        canonical_caption(Scene("white", (ShapeObject("circle", "red", "small", "top left"),)))
        == "a small red circle in the top left corner on a white background"
    )
    for scene in _scenes(1000, seed=4) + _scenes(200, seed=4, split="heldout"):
        spec = parse_caption(canonical_caption(scene))
        assert spec == SceneSpec.from_scene(scene) and spec.is_complete and spec.to_scene() == scene


def test_every_template_parses_and_is_true():
    seen = set()
    rng = random.Random(5)
    for scene in _scenes(3000, seed=5):
        text = caption(scene, rng)
        spec = parse_caption(text)
        assert spec.matches(scene), (text, scene)
        seen.update(m.group(1) for m in cap._TOKEN.finditer(text))
    assert seen == set(cap._VOCAB)  # every phrase of the language occurs and parses


def test_pair_cell_rate_sets_how_often_two_objects_cells_are_named():
    scenes = _scenes(400, seed=6)
    pairs = [s for s in scenes if len(s.objects) == 2]
    for rate, expected in ((0.0, 0.0), (1.0, 1.0)):
        rng = random.Random(6)
        named = [o.cell is not None for s in pairs for o in parse_caption(caption(s, rng, rate)).objects]
        assert sum(named) / len(named) == expected
    singles = [s for s in scenes if len(s.objects) == 1]
    assert any(parse_caption(caption(s, random.Random(i), 0.0)).objects[0].cell for i, s in enumerate(singles))
    with pytest.raises(ValueError, match="pair_cell_rate"):
        caption(pairs[0], random.Random(0), 1.5)


def test_parse_caption_rejects_what_it_cannot_read():
    assert parse_caption("A Red Circle.") == SceneSpec(None, (ObjectSpec("circle", "red"),))
    for bad, why in [
        ("a circle", "no colour"),
        ("a red dog", "unknown words"),
        ("a red", "no shape"),
        ("a red circle left of", "relation"),
        ("a red circle a blue square", "relation"),
        ("in the center a red circle", "does not follow"),
        ("a red circle on a white background on a black background", "two backgrounds"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_caption(bad)
    with pytest.raises(ValueError, match="relation for cells"):  # contradicts itself
        parse_caption("a red circle on the left to the right of a blue square on the right")


def test_spec_matching_checks_attributes_and_relation():
    scene = Scene(
        "black",
        (ShapeObject("circle", "red", "small", "left"), ShapeObject("square", "blue", "large", "right")),
        "left of",
    )
    assert parse_caption("a blue square to the right of a red circle").matches(scene)
    assert parse_caption("a red circle left of a big blue square on a black background").matches(scene)
    assert not parse_caption("a red circle to the right of a blue square").matches(scene)
    assert not parse_caption("a red circle above a blue square").matches(scene)
    assert not parse_caption("a large red circle left of a blue square").matches(scene)
    assert not parse_caption("a red circle on a white background").matches(scene)


def test_rendered_colours_at_object_anchors():
    rng = random.Random(6)
    for k, scene in enumerate(_scenes(300, seed=6)):
        size = 64 if k % 3 else 32
        jitter_seed = rng.randrange(2**32)
        img = np.asarray(render(scene, size, random.Random(jitter_seed))).astype(int)
        placements = layout(scene, size, random.Random(jitter_seed))
        for obj, p in zip(scene.objects, placements, strict=True):
            assert abs(p.cx - (CELL_ROWCOL[obj.cell][1] + 0.5) * size / 3) <= JITTER * size + 1e-9
            x, y = (int(v) for v in p.anchor)
            assert np.abs(img[y, x] - COLORS[obj.color]).max() <= 2, (scene, obj)
        if len(placements) == 2:  # boxes never overlap
            a, b = placements
            assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= a.radius + b.radius
        free = next(c for c in CELLS if c not in {o.cell for o in scene.objects})
        row, col = CELL_ROWCOL[free]
        assert tuple(img[int((row + 0.5) * size / 3), int((col + 0.5) * size / 3)]) == BACKGROUNDS[scene.background]
    assert render(scene, 64).size == (64, 64) and render(scene, 64).mode == "RGB"


def test_write_shapes_folder_reads_back(tmp_path):
    calls = []
    out = write_shapes_folder(tmp_path / "shapes", 6, seed=2, size=32, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (6, 6)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i:05d}.{ext}" for i in range(6) for ext in ("png", "txt")] + ["metadata.jsonl"])
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    ds = ShapesDataset(6, seed=2, size=32)
    folder = CaptionedFolder(out, size=32)
    assert len(folder) == 6 and not folder.skipped
    for i, record in enumerate(records):
        img, text, scene = ds[i]
        assert Scene.from_dict(record["scene"]) == scene and record["text"] == text
        assert (out / f"{i:05d}.txt").read_text() == text
        x, folder_text = folder[i]
        assert folder_text == text and torch.equal(x, image_to_tensor(img)[0])


@pytest.mark.parametrize("kind", ["single", "heldout", "relation"])
def test_prompt_suites(kind):
    suite = prompt_suite(kind)
    assert suite == prompt_suite(kind) and len(suite) == 200
    assert len({p for p, _ in suite}) == 200
    for prompt, spec in suite:
        assert parse_caption(prompt) == spec
        pairs = {(o.color, o.shape) for o in spec.objects}
        if kind == "heldout":
            assert pairs <= HELD_OUT_PAIRS and spec.is_complete
        else:
            assert not pairs & HELD_OUT_PAIRS
        assert len(spec.objects) == (2 if kind == "relation" else 1)
    assert prompt_suite(kind, n=300, seed=1)[:5] != suite[:5]


def test_prompt_suite_errors():
    with pytest.raises(ValueError, match=r"kind must be one of \['single', 'heldout', 'relation'\]"):
        prompt_suite("pairs")
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 324\]"):
        prompt_suite("heldout", n=325)


def test_inverse_relation_caption_turns_only_the_relation_round():
    rng = random.Random(3)
    contradictions = 0
    for _ in range(500):
        scene = sample_scene(rng, "train", n_objects=2)
        text = caption(scene, rng)
        inverse = cap.inverse_relation_caption(text)
        assert len(inverse.split()) == len(text.split())
        try:
            spec, turned = parse_caption(text), parse_caption(inverse)
        except ValueError:  # both cells named: the turned relation contradicts them
            contradictions += 1
            continue
        assert turned == SceneSpec(spec.background, spec.objects, INVERSE_RELATION[spec.relation])
        assert not turned.matches(scene)
    assert 0 < contradictions < 50
    assert cap.inverse_relation_caption("a red circle on the left in the lower left corner") is None
    assert cap.inverse_relation_caption("a red disc under a blue star") == "a red disc above a blue star"
