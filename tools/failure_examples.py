"""Failure cases for the model card: the first failed prompts of each suite of an evaluation,
regenerated with their seeds and settings and shown with what the judge saw.

    .venv/bin/python tools/failure_examples.py --eval docs/eval/eval.json --out docs/images/failures.png
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

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
    cell = size * SCALE
    cols = max(1, args.per_suite)
    rows = (len(picked) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell * 2, max(1, rows) * (cell + TEXT_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, record in enumerate(picked):
        params = GenerationParams(record["prompt"], width=size, height=size, steps=settings["steps"],
                                  sampler=settings["sampler"], schedule=settings["schedule"],
                                  guidance_scale=settings["guidance_scale"], seed=record["seed"])  # fmt: skip
        image = pipe.generate(params)[0].resize((cell, cell), Image.NEAREST)
        x, y = (i % cols) * cell * 2, (i // cols) * (cell + TEXT_HEIGHT)
        grid.paste(image, (x, y))
        text = f"[{record['suite']}] {record['prompt']} (seed {record['seed']}) -- {_describe(record)}"
        for j, line in enumerate(textwrap.wrap(text, width=2 * cell // 6)[:6]):
            draw.text((x + 4, y + cell + 2 + 13 * j), line, fill="black", font=font)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(out)


if __name__ == "__main__":
    main()
