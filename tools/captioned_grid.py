"""A grid of images, each enlarged (nearest neighbour) with a wrapped caption under it, for the
pictures in the docs (tools/make_readme_grid.py, tools/failure_examples.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 13
CHAR_WIDTH = 6  # of PIL's default font


def captioned_grid(
    images: list[Image.Image],
    captions: list[str],
    cols: int,
    cell: int,
    caption_height: int,
    slot_width: int | None = None,
    max_lines: int = 3,
    footer: str = "",
) -> Image.Image:
    """`images` resized to `cell` x `cell` in `cols` columns of `slot_width` (default `cell`) pixels,
    each with up to `max_lines` lines of its caption below; `footer`, if any, on a last line."""
    slot_width = slot_width or cell
    rows = max(1, (len(images) + cols - 1) // cols)
    footer_height = 24 if footer else 0
    grid = Image.new("RGB", (cols * slot_width, rows * (cell + caption_height) + footer_height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * slot_width, (i // cols) * (cell + caption_height)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, width=slot_width // CHAR_WIDTH)[:max_lines]):
            draw.text((x + 4, y + cell + 2 + LINE_HEIGHT * j), line, fill="black", font=font)
    if footer:
        draw.text((4, grid.height - footer_height + 6), footer, fill="black", font=font)
    return grid


def save_grid(grid: Image.Image, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(out)
    return out
