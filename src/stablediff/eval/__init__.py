"""Does a generated image follow its prompt? A programmatic judge for the shapes world and the
prompt-suite evaluation built on it.

- :mod:`stablediff.eval.detect`: ``describe(image)``, what is in an image, without a prompt;
- :mod:`stablediff.eval.judge`: ``judge(image, spec) -> Verdict``, the image against its prompt;
- :mod:`stablediff.eval.evaluate`: ``evaluate(generate_fn, ...)``, ``validate_judge``,
  ``write_report``;
- :mod:`stablediff.eval.sweep`: ``sweep`` over samplers, steps and guidance, ``plot_sweep``.

Only the shapes world (``stablediff.shapes``), numpy and PIL are imported,
never the pipeline: the caller wraps the pipeline into ``generate_fn(prompt, seed) -> image``.
"""

from stablediff.eval.detect import DetectedObject, analyse, describe
from stablediff.eval.evaluate import (
    Degradation,
    degraded_render,
    evaluate,
    format_report,
    validate_judge,
    write_report,
)
from stablediff.eval.judge import ObjectVerdict, Verdict, judge
from stablediff.eval.sweep import plot_sweep, sweep, write_sweep

__all__ = [
    "Degradation",
    "DetectedObject",
    "ObjectVerdict",
    "Verdict",
    "analyse",
    "degraded_render",
    "describe",
    "evaluate",
    "format_report",
    "judge",
    "plot_sweep",
    "sweep",
    "validate_judge",
    "write_report",
    "write_sweep",
]
