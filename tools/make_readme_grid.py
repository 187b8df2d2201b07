"""The README's picture: a grid of images from the bundled model, each under its prompt.

    .venv/bin/python tools/make_readme_grid.py [--model shapes] [--out docs/images/bundled_grid.png]

Every image is generated here, with the settings printed under the grid (nothing is edited by
hand); rerun after retraining the model.
"""

from __future__ import annotations

import argparse

from captioned_grid import captioned_grid, save_grid

from stablediff import GenerationParams, load_pipeline

PROMPTS = [
    "a red circle above a blue square",
    "a large yellow star in the center on a black background",
    "a small green triangle in the top left corner",
    "a purple heart to the right of an orange cross",
    "a cyan square at the bottom on a gray background",
    "a pink circle to the left of a green star on a white background",
    "a blue cross in the top right corner on a black background",
    "an orange triangle below a red heart",
]
SCALE = 3  # 64 px images shown at 192 px
CAPTION_HEIGHT = 44


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--out", default="docs/images/bundled_grid.png")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    size = pipe.spec.default_size
    images = [
        pipe.generate(
            GenerationParams(
                prompt, width=size, height=size, steps=20, sampler="dpmpp_2m", schedule="karras", seed=args.seed + i
            )
        )[0]
        for i, prompt in enumerate(PROMPTS)
    ]
    note = (
        f"stablediff bundled model, {size}x{size}, DPM++ 2M Karras, 20 steps, CFG 7.5, "
        f"seeds {args.seed}..{args.seed + len(PROMPTS) - 1}"
    )
    save_grid(
        captioned_grid(images, PROMPTS, cols=4, cell=size * SCALE, caption_height=CAPTION_HEIGHT, footer=note), args.out
    )


if __name__ == "__main__":
    main()
