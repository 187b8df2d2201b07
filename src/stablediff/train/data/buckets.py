"""Aspect-ratio buckets: image shapes of about equal pixel count, so that photographs of any
aspect ratio are trained whole instead of cropped to a square (as NovelAI and kohya's trainers do).

`bucket_shapes(resolution, step, max_aspect)` lists the (width, height) pairs, each a multiple of
`step`, with an area at most ``resolution**2`` and as close to it as the step allows (one bucket
per short side, landscape and portrait), from the widest allowed ratio to the tallest. An image
goes to the bucket whose aspect ratio is nearest to its own in log scale (`nearest_bucket`); it is
then scaled to cover the bucket and cropped by at most a step's worth on one side. Batches are
drawn from one bucket at a time (`order.BucketBatches`).
"""

from __future__ import annotations

import math


def bucket_shapes(resolution: int, step: int = 64, max_aspect: float = 2.5) -> list[tuple[int, int]]:
    """(width, height) buckets for images of about ``resolution**2`` pixels, widest first."""
    if step < 8 or step % 8:
        raise ValueError(f"bucket_step must be a positive multiple of 8, got {step}")
    if step > resolution:
        raise ValueError(f"bucket_step={step} must not exceed resolution={resolution}")
    if not 1.0 <= max_aspect <= 8.0:
        raise ValueError(f"bucket_max_aspect must be in [1, 8], got {max_aspect}")
    area = resolution * resolution
    shapes = set()
    for short in range(step, resolution + 1, step):
        long = (area // short) // step * step  # the longest side the area allows for this short one
        if long / short <= max_aspect + 1e-9:
            shapes |= {(long, short), (short, long)}
    return sorted(shapes, key=lambda s: (-s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, shapes: list[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest to width/height (log distance; ties
    go to the larger area, then to the first listed)."""
    ratio = math.log(width / height)
    return min(
        range(len(shapes)), key=lambda k: (abs(math.log(shapes[k][0] / shapes[k][1]) - ratio), -_area(shapes[k]))
    )


def _area(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1]
