"""The procedural shapes world: scenes, their images and their captions, as one import.

The bundled model is trained on this world and judged on it, so training (`stablediff.train`),
evaluation (`stablediff.eval`) and the tools all import it from here; it imports none of them.

- :mod:`stablediff.shapes.world`: the constants, ``ShapeObject``, ``Scene``, ``sample_scene``;
- :mod:`stablediff.shapes.render`: ``layout`` and ``render``;
- :mod:`stablediff.shapes.captions`: caption templates, ``canonical_caption``, ``parse_caption``,
  prompt suites, grounding regions;
- :mod:`stablediff.shapes.dataset`: ``ShapesDataset``, ``shapes_captions``, ``write_shapes_folder``.
"""

from stablediff.shapes.captions import (
    SUITES,
    ObjectSpec,
    SceneSpec,
    canonical_caption,
    caption,
    caption_regions,
    inverse_relation_caption,
    parse_caption,
    prompt_suite,
)
from stablediff.shapes.dataset import ShapesDataset, shapes_captions, write_shapes_folder
from stablediff.shapes.render import ANCHORS, OUTLINES, Placement, layout, render
from stablediff.shapes.world import (
    ALL_PAIRS,
    BACKGROUNDS,
    CELL_ROWCOL,
    CELLS,
    COLORS,
    HELD_OUT_PAIRS,
    INVERSE_RELATION,
    JITTER,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TRAIN_PAIRS,
    Scene,
    ShapeObject,
    sample_scene,
    true_relations,
)

__all__ = [
    "ALL_PAIRS",
    "ANCHORS",
    "BACKGROUNDS",
    "CELLS",
    "CELL_ROWCOL",
    "COLORS",
    "HELD_OUT_PAIRS",
    "INVERSE_RELATION",
    "JITTER",
    "OUTLINES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "SUITES",
    "TRAIN_PAIRS",
    "ObjectSpec",
    "Placement",
    "Scene",
    "SceneSpec",
    "ShapeObject",
    "ShapesDataset",
    "canonical_caption",
    "caption",
    "caption_regions",
    "inverse_relation_caption",
    "layout",
    "parse_caption",
    "prompt_suite",
    "render",
    "sample_scene",
    "shapes_captions",
    "true_relations",
    "write_shapes_folder",
]
