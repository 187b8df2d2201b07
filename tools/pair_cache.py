"""A latent cache of two-object scenes whose captions name the objects' cells more often: data for
teaching a U-Net whose position is whose (docs/model-card.md, "Why two-object relations fail").

    .venv/bin/python tools/pair_cache.py --out runs/ft/bind.safetensors [--append runs/ft/latents.safetensors]
        [--model FILE] [--n 25000] [--seed 11] [--cell-rate 0.5]

Renders `n` two-object training scenes (seed `seed`), captions each with every object's cell named
with probability `cell-rate` (the shapes data uses 0.25), encodes them with the model's VAE and
writes a latent cache, after the scenes of `--append`'s cache when given.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from stablediff import load_pipeline
from stablediff.train.captions import caption
from stablediff.train.latents import encode_latent_cache
from stablediff.train.shapes import item_seed, render, sample_scene
from stablediff.weights.io import read_metadata, read_state_dict, write_safetensors


class CellRichPairs:
    def __init__(self, n: int, seed: int, cell_rate: float):
        self.n, self.seed, self.cell_rate = n, seed, cell_rate

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        scene = sample_scene(random.Random(item_seed(self.seed, "train", i, "scene")), "train", n_objects=2)
        image = render(scene, 64, random.Random(item_seed(self.seed, "train", i, "jitter")))
        text = caption(scene, random.Random(item_seed(self.seed, "train", i, "caption")), self.cell_rate)
        return image, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--append", default=None, help="a latent cache of the same VAE to put first")
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--n", type=int, default=25000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cell-rate", type=float, default=0.5)
    args = parser.parse_args()
    vae = load_pipeline(args.model).vae
    pairs = CellRichPairs(args.n, args.seed, args.cell_rate)
    if not args.append:
        encode_latent_cache(pairs, vae, args.out, batch_size=64)
        return
    with tempfile.TemporaryDirectory() as tmp:
        encoded = encode_latent_cache(pairs, vae, Path(tmp) / "pairs.safetensors", batch_size=64)
        first, second = read_state_dict(args.append), read_state_dict(encoded)
        meta, extra = read_metadata(args.append), read_metadata(encoded)
        if meta["vae_config"] != extra["vae_config"]:
            raise SystemExit(f"{args.append} was encoded by another VAE than --model's")
        captions = json.loads(meta["captions"]) + json.loads(extra["captions"])
        meta |= {"count": str(len(captions)), "captions": json.dumps(captions, ensure_ascii=False)}
        write_safetensors({k: torch.cat([first[k], second[k]]) for k in ("mean", "std")}, args.out, meta)


if __name__ == "__main__":
    main()
