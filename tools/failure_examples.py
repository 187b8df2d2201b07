"""Failure cases for the model card: the first failed prompts of each suite of an evaluation,
regenerated with their seeds and settings and shown with what the judge saw.

    .venv/bin/python tools/failure_examples.py --eval docs/eval/eval.json --out docs/images/failures.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioned_grid import captioned_grid, save_grid

from stablediff import GenerationParams, load_pipeline

SCALE = 3
TEXT_HEIGHT = 84


def _describe(record: dict) -> str:
    verdict = record["verdict"]
    seen = ", ".join(f"{d['size']} {d['color']} {d['shape']} at {d['cell']}" for d in verdict["detected"]) or "nothing"
    return f"seen: {seen}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", default="docs/eval/eval.json")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--out", default="docs/images/failures.png")
    parser.add_argument("--per-suite", type=int, default=3)
    args = parser.parse_args()

    result = json.loads(Path(args.eval).read_text())
    settings = result["settings"]
    pipe = load_pipeline(args.model)
    size = settings["size"]
    picked = []
    for suite in result["suites"]:
        failed = [r for r in result["records"] if r["suite"] == suite and not r["all_correct"]]
        picked += failed[: args.per_suite]
    images = [
        pipe.generate(
            GenerationParams(
                r["prompt"],
                width=size,
                height=size,
                steps=settings["steps"],
                sampler=settings["sampler"],
                schedule=settings["schedule"],
                guidance_scale=settings["guidance_scale"],
                seed=r["seed"],
            )
        )[0]
        for r in picked
    ]
    captions = [f"[{r['suite']}] {r['prompt']} (seed {r['seed']}) -- {_describe(r)}" for r in picked]
    cell = size * SCALE
    save_grid(
        captioned_grid(
            images,
            captions,
            cols=max(1, args.per_suite),
            cell=cell,
            caption_height=TEXT_HEIGHT,
            slot_width=2 * cell,
            max_lines=6,
        ),
        args.out,
    )


if __name__ == "__main__":
    main()
