"""Which words does a text encoder tell apart? The spread of its states over one attribute's values.

    .venv/bin/python tools/attribute_spread.py [--model FILE] [--text RUN/text/export] [--n 64] [--seed 1234]

For `n` random single-object scenes, takes the canonical caption ("a small red circle in the top
left corner on a white background") and its variants that change one attribute only (every colour,
every shape, both sizes, every cell) and measures how far apart the encoder puts them: the mean
cosine distance (1 - cosine similarity) between the variants' states at the end-of-text token,
which a causal encoder computes from the whole caption. An attribute whose spread falls towards 0
is one the U-Net can no longer read from the text. Prints the spread per attribute and each as a
multiple of colour's.

`--text`: a text stage's export folder (its encoder and tokenizer) instead of the model's, e.g. the
contrastive starting point of a run whose U-Net stage trained the encoder further.
"""

from __future__ import annotations

import argparse
import dataclasses
import random

import torch
import torch.nn.functional as F

from stablediff import load_pipeline
from stablediff.shapes import ObjectSpec, SceneSpec, canonical_caption, sample_scene
from stablediff.shapes.world import CELLS, COLORS, SHAPES, SIZES
from stablediff.train.exports import TEXT_PART, load_tokenizer, read_part

VALUES = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "cell": list(CELLS)}


def spread(encoder, tokenizer, spec: SceneSpec, attribute: str) -> float:
    """Mean pairwise cosine distance of the end-of-text states of `spec`'s captions over `attribute`."""
    obj = spec.objects[0]
    captions = [
        canonical_caption(dataclasses.replace(spec, objects=(dataclasses.replace(obj, **{attribute: v}),)))
        for v in VALUES[attribute]
    ]
    ids = torch.tensor(tokenizer(captions), dtype=torch.long)
    eos = (ids == tokenizer.eos_id).int().argmax(1)
    states = F.normalize(encoder(ids)[torch.arange(len(ids)), eos], dim=-1)
    n = len(captions)
    return float((1 - states @ states.T).sum() / (n * (n - 1)))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--text", default=None, help="a text stage export folder, measured instead of the model's")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if args.text:
        encoder, tokenizer = read_part(TEXT_PART, args.text), load_tokenizer(args.text)
    else:
        pipe = load_pipeline(args.model)
        encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    encoder.eval()
    rng = random.Random(args.seed)
    specs = []
    for _ in range(args.n):
        o = sample_scene(rng, "train", n_objects=1).objects[0]
        specs.append(SceneSpec(sample_scene(rng).background, (ObjectSpec(o.shape, o.color, o.size, o.cell),)))
    spreads = {a: sum(spread(encoder, tokenizer, s, a) for s in specs) / len(specs) for a in VALUES}
    for attribute, value in spreads.items():
        print(f"{attribute:6s} spread {value:.4f}  ({value / spreads['color']:.2f}x colour's)")


if __name__ == "__main__":
    main()
