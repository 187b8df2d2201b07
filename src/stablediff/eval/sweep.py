"""Sampler x steps x guidance sweeps of prompt-following accuracy, and their plots.

``sweep`` calls ``make_generate_fn(sampler, steps, guidance)`` for each setting and runs
``evaluate`` with it on the same prompts and seeds, so rows differ by the setting only.
``plot_sweep`` draws accuracy against steps (one line per sampler), against guidance, and
against the time per image. matplotlib is imported only there (Agg backend, no display).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stablediff.eval.evaluate import METRICS, GenerateFn, _atomic_write, _pct, evaluate

SAMPLERS = ("ddim", "euler", "dpmpp_2m", "unipc")
STEPS = (4, 8, 20, 50)
GUIDANCES = (1.0, 3.0, 5.0, 7.5)


def sweep(
    make_generate_fn: Callable[[str, int, float], GenerateFn],
    samplers: Sequence[str] = SAMPLERS,
    steps: Sequence[int] = STEPS,
    guidances: Sequence[float] = GUIDANCES,
    n: int = 50,
    seed: int = 0,
    suites: Sequence[str] = ("single", "relation"),
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every (sampler, steps, guidance) of the grid on ``n`` prompts per suite.

    Cost: ``len(samplers) * len(steps) * len(guidances) * n * len(suites)`` images (the defaults:
    64 settings x 100 images). The judge's validation is skipped here (it does not depend on the
    setting; ``evaluate`` reports it). ``progress(done, total)`` after each setting.

    Returns one row per setting: ``sampler``, ``steps``, ``guidance``, ``seconds_per_image``, the
    ``METRICS`` over all suites, and ``{suite}/all_correct`` per suite.
    """
    grid = list(itertools.product(samplers, steps, guidances))
    if not grid:
        raise ValueError("empty sweep: samplers, steps and guidances must each name at least one value")
    rows = []
    for done, (sampler, n_steps, guidance) in enumerate(grid, 1):
        result = evaluate(make_generate_fn(sampler, n_steps, guidance), suites, n, seed, judge_n=0)
        row: dict[str, Any] = {
            "sampler": sampler,
            "steps": n_steps,
            "guidance": guidance,
            "seconds_per_image": result["seconds_per_image"],
        }
        row |= result["overall"]
        row |= {f"{s}/all_correct": m["all_correct"] for s, m in result["suites"].items()}
        rows.append(row)
        if progress is not None:
            progress(done, len(grid))
    return rows


def write_sweep(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``sweep.json`` (the rows) and ``sweep.md`` (a table) in ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ("color_shape", "size", "position", "relation", "all_correct")
    lines = ["| sampler | steps | guidance | s/image | " + " | ".join(cols) + " |", "|---" * (4 + len(cols)) + "|"]
    lines += [
        f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['seconds_per_image']:.3f} | "
        + " | ".join(_pct(r.get(c)) for c in cols)
        + " |"
        for r in rows
    ]
    _atomic_write(out / "sweep.json", json.dumps(list(rows), indent=1) + "\n")
    _atomic_write(out / "sweep.md", "\n".join(lines) + "\n")
    return out / "sweep.json", out / "sweep.md"


def _middle(values: set[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def plot_sweep(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    metric: str = "all_correct",
    guidance: float | None = None,
    steps: int | None = None,
) -> Path:
    """Three panels of ``metric`` (one of ``METRICS`` or ``{suite}/all_correct``): against steps
    per sampler at ``guidance`` (None: the middle guidance swept), against guidance per sampler at
    ``steps`` (None: the most steps swept), and against seconds per image for every row. Writes a
    PNG to ``path`` (temporary name, then renamed) and returns it."""
    if not rows:
        raise ValueError("no rows to plot")
    if metric not in METRICS and metric not in rows[0]:
        raise ValueError(f"metric must be one of {list(METRICS)} or a row key, got {metric!r}")
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display, even where one exists
    import matplotlib.pyplot as plt

    guidance = _middle({r["guidance"] for r in rows}) if guidance is None else guidance
    steps = max(r["steps"] for r in rows) if steps is None else steps
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))

    def value(r: dict[str, Any]) -> float:
        return float("nan") if r.get(metric) is None else 100 * r[metric]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for s in samplers:
        mine = [r for r in rows if r["sampler"] == s]
        by_steps = sorted((r["steps"], value(r)) for r in mine if r["guidance"] == guidance)
        by_guidance = sorted((r["guidance"], value(r)) for r in mine if r["steps"] == steps)
        if by_steps:
            axes[0].plot(*zip(*by_steps, strict=True), marker="o", label=s)
        if by_guidance:
            axes[1].plot(*zip(*by_guidance, strict=True), marker="o", label=s)
        axes[2].scatter([r["seconds_per_image"] for r in mine], [value(r) for r in mine], label=s)
    swept = sorted({r["steps"] for r in rows})
    axes[0].set(xscale="log", xlabel="steps", title=f"guidance {guidance:g}")
    axes[0].set_xticks(swept, [str(x) for x in swept])
    axes[0].minorticks_off()
    axes[1].set(xlabel="guidance scale", title=f"{steps} steps")
    axes[2].set(xlabel="seconds per image", title="all settings")
    for ax in axes:
        ax.set(ylabel=f"{metric} (%)", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
