"""How far can knowing the relation alone lower the grounding loss, when the image shows nothing?

    .venv/bin/python tools/grounding_bound.py [--n 20000] [--seed 0]

At the start of sampling (t -> T) a U-Net cannot see where the objects will be; the best its
object words' attention can do is follow what the caption says. Over `n` fresh two-object scenes,
the grounding loss of `stablediff.train.grounding` ((1 - share of attention in the object's box)^2,
per object) for attention spread: uniformly; as the average box of any object (the position
prior); as the average box of objects in the same role of the same relation ("left of" another
object, ...); and all on the likeliest pixel given that relation. Printed for 8x8 and 4x4 maps,
the attention resolutions of the bundled model's 16x16 latents.
"""

from __future__ import annotations

import argparse
import random

import torch

from stablediff.shapes import INVERSE_RELATION, layout, sample_scene
from stablediff.train.grounding import box_masks


def grounding(attention: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean (1 - share)^2 of `attention` (a map per object, or one for all) over the objects' `masks`."""
    attention = attention / attention.sum(-1, keepdim=True)
    return float(((1 - (attention.expand_as(masks) * masks).sum(-1)) ** 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    relations, boxes = [], []  # per object: its relation to the other object, its box
    for _ in range(args.n):
        scene = sample_scene(rng, "train", n_objects=2)
        placements = layout(scene, 64, random.Random(rng.randrange(2**32)))
        for p, relation in zip(placements, (scene.relation, INVERSE_RELATION[scene.relation]), strict=True):
            relations.append(relation)
            boxes.append(p.box(64))
    for side in (8, 4):
        masks = box_masks(torch.tensor(boxes), side, side)  # [objects, side * side]
        mean_box = {r: masks[[i for i, x in enumerate(relations) if x == r]].mean(0) for r in set(relations)}
        given = torch.stack([mean_box[r] for r in relations])
        peak = (given == given.max(-1, keepdim=True).values).float()
        print(
            f"{side}x{side} attention: uniform {grounding(torch.ones(side * side), masks):.3f}, position prior "
            f"{grounding(masks.mean(0), masks):.3f}, prior given the relation {grounding(given, masks):.3f}, "
            f"likeliest pixel given the relation {grounding(peak, masks):.3f}"
        )


if __name__ == "__main__":
    main()
