"""Prompt-following evaluation: generate the prompt suites, judge every image, report accuracies.

The evaluation sees only ``generate_fn(prompt, seed) -> PIL.Image``, never the pipeline, so tests
can pass a fake generator (the true scene rendered: ~100%; wrong colours: low colour accuracy) and
the caller decides sampler, steps, guidance and device.

Every result also carries the judge's own accuracy on rendered ground truth, clean and degraded
(``validate_judge``), at the size of the generated images: a number measured by a judge is only
as good as the judge.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from stablediff.eval.detect import MAX_SIDE
from stablediff.eval.judge import Verdict, judge
from stablediff.shapes import (
    BACKGROUNDS,
    COLORS,
    SPLITS,
    SUITES,
    Scene,
    SceneSpec,
    canonical_caption,
    layout,
    parse_caption,
    prompt_suite,
    render,
    sample_scene,
)

log = logging.getLogger(__name__)

GenerateFn = Callable[[str, int], Image.Image]
OBJECT_METRICS = ("color", "shape", "color_shape", "size", "position")
SCENE_METRICS = ("relation", "background", "count", "all_correct")
METRICS = OBJECT_METRICS + SCENE_METRICS


@dataclass(frozen=True)
class Degradation:
    """What a generated image may look like next to a clean render: per-object (and background)
    colour shifts, uniform in ``[-shift, shift]`` per channel (0-255 levels); then a Gaussian blur
    of radius uniform in ``blur`` (pixels of a 64 px image, scaled with the size); then Gaussian
    noise of standard deviation ``noise`` levels per channel; rounded to uint8."""

    shift: float = 10.0
    blur: tuple[float, float] = (0.5, 1.0)
    noise: float = 8.0


def degraded_render(
    scene: Scene, size: int, jitter_seed: int, rng: np.random.Generator, degradation: Degradation | None = None
) -> Image.Image:
    """``render(scene, size, random.Random(jitter_seed))`` degraded by ``degradation`` (None: the
    default ``Degradation()``), its random draws taken from ``rng``.

    Each object gets its own colour shift: a rendered pixel is ``B + a (C - B)`` for the
    background ``B`` and one object's colour ``C`` (objects never touch; the nearest object centre
    owns a pixel), so it is redrawn as ``B' + a (C' - B')`` with shifted colours.
    """
    degradation = degradation or Degradation()
    img = np.asarray(render(scene, size, random.Random(jitter_seed)), dtype=np.float64)
    places = layout(scene, size, random.Random(jitter_seed))
    ys, xs = np.mgrid[:size, :size] + 0.5
    owner = np.stack([(xs - p.cx) ** 2 + (ys - p.cy) ** 2 for p in places]).argmin(0)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    new_bg = bg + rng.uniform(-degradation.shift, degradation.shift, 3)
    out = np.broadcast_to(new_bg, img.shape).copy()
    for i, obj in enumerate(scene.objects):
        d = np.array(COLORS[obj.color], dtype=np.float64) - bg
        alpha = np.clip((img - bg) @ d / (d @ d), 0.0, 1.0)
        new_color = bg + d + rng.uniform(-degradation.shift, degradation.shift, 3)
        out[owner == i] = new_bg + alpha[owner == i][:, None] * (new_color - new_bg)
    image = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*degradation.blur) * size / 64))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, degradation.noise, (size, size, 3))
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), "RGB")


def _mean(values: Sequence[bool | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _object_flags(v: Verdict) -> dict[str, list[bool | None]]:
    return {
        "color": [o.color for o in v.objects],
        "shape": [o.shape for o in v.objects],
        "color_shape": [o.color and o.shape for o in v.objects],
        "size": [o.size for o in v.objects],
        "position": [o.position for o in v.objects],
    }


def _judge_accuracy(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Per-attribute accuracy over checks (objects for colour/shape/size/position, scenes for
    relation/background/count), ``overall`` over all those checks, ``all_correct`` over scenes."""
    flags: dict[str, list[bool | None]] = {k: [] for k in ("color", "shape", "size", "position")}
    flags |= {"relation": [], "background": [], "count": []}
    for v in verdicts:
        for k, values in _object_flags(v).items():
            if k in flags:
                flags[k] += values
        flags["relation"].append(v.relation)
        flags["background"].append(v.background)
        flags["count"].append(v.count)
    out: dict[str, Any] = {k: _mean(vs) for k, vs in flags.items()}
    out["overall"] = _mean([x for vs in flags.values() for x in vs])
    out["all_correct"] = _mean([v.all_correct for v in verdicts])
    return out


@functools.lru_cache(maxsize=16)
def _validate(n: int, seed: int, degradation: Degradation | None, size: int) -> str:
    rng, noise_rng = random.Random(seed), np.random.default_rng(seed)
    verdicts, groups = [], {}
    t0 = time.perf_counter()
    for i in range(n):
        scene = sample_scene(rng, SPLITS[i % 2])  # held-in and held-out pairs alike
        spec = parse_caption(canonical_caption(scene))  # the prompt path: caption -> parser -> spec
        assert spec == SceneSpec.from_scene(scene)
        jitter_seed = rng.randrange(2**32)
        image = (
            degraded_render(scene, size, jitter_seed, noise_rng, degradation)
            if degradation
            else render(scene, size, random.Random(jitter_seed))
        )
        verdict = judge(image, spec)
        verdicts.append(verdict)
        for key in (f"{len(scene.objects)} objects", f"{scene.background} background"):
            groups.setdefault(key, []).append(verdict)
    result = _judge_accuracy(verdicts)
    result["by_group"] = {k: _judge_accuracy(vs)["overall"] for k, vs in sorted(groups.items())}
    result |= {
        "n": n,
        "seed": seed,
        "image_size": size,
        "degradation": asdict(degradation) if degradation else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return json.dumps(result)


def validate_judge(
    n: int = 500, seed: int = 1234, degraded: bool = False, size: int = 64, degradation: Degradation | None = None
) -> dict[str, Any]:
    """The judge's accuracy on ``n`` freshly rendered random scenes (one or two objects, every
    background, held-in and held-out pairs), each judged against its canonical caption.

    ``degraded``: images pass through ``degraded_render`` with ``degradation`` (None: the
    default ``Degradation``: per-object colour shift +-10, blur radius 0.5-1 px at 64 px, noise
    sigma 8). Returns
    per-attribute accuracies, ``overall`` (all attribute checks), ``all_correct`` (scenes),
    ``by_group`` (overall per object count and per background) and the settings. Cached per
    arguments: evaluations at one size share one validation.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if degraded:
        degradation = degradation or Degradation()
    elif degradation is not None:
        raise ValueError("degradation is given but degraded is False")
    return json.loads(_validate(n, int(seed), degradation, min(int(size), MAX_SIDE)))


def _suite_metrics(verdicts: Sequence[Verdict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    per_object = [_object_flags(v) for v in verdicts]
    for k in OBJECT_METRICS:
        out[k] = _mean([x for f in per_object for x in f[k]])
    # A relation is followed only when both objects are right (colour and shape) and it holds.
    out["relation"] = _mean(
        [None if v.relation is None else v.relation and all(o.color and o.shape for o in v.objects) for v in verdicts]
    )
    out["background"] = _mean([v.background for v in verdicts])
    out["count"] = _mean([v.count for v in verdicts])
    out["all_correct"] = _mean([v.all_correct for v in verdicts])
    return out


def evaluate(
    generate_fn: GenerateFn,
    suites: Sequence[str] = SUITES,
    n: int = 200,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    judge_n: int = 300,
    image_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Generate and judge ``n`` prompts of each suite (``prompt_suite(suite, n, seed)``).

    Prompt ``i`` of a suite is generated with seed ``seed + i`` (the same seeds in every suite
    and every run, so samplers and settings are compared on equal noise). ``progress(done,
    total)`` after each image; ``image_dir``: also save each image as ``{suite}_{i:04d}.png``.
    ``judge_n``: scenes for the judge's validation at the generated size (0: skip it).

    Returns ``{"suites": {suite: metrics}, "overall": metrics, "judge": {"clean", "degraded"},
    "records": [...], "seconds_per_image", "judge_seconds_per_image", "n", "seed", "size"}``;
    metrics are fractions in [0, 1] (None where no prompt asks for that attribute), see
    ``METRICS``. A record: suite, index, prompt, seed, all_correct and the verdict's summary.
    """
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"suite must be one of {list(SUITES)}, got {s!r}")
    prompts = [(s, i, p, spec) for s in suites for i, (p, spec) in enumerate(prompt_suite(s, n, seed))]
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    verdicts: dict[str, list[Verdict]] = {s: [] for s in suites}
    records, gen_time, judge_time, size = [], 0.0, 0.0, None
    for done, (suite, i, prompt, spec) in enumerate(prompts, 1):
        t0 = time.perf_counter()
        image = generate_fn(prompt, seed + i)
        t1 = time.perf_counter()
        if not isinstance(image, Image.Image):
            raise TypeError(f"generate_fn must return a PIL image, got {type(image).__name__}")
        verdict = judge(image, spec)
        gen_time, judge_time = gen_time + t1 - t0, judge_time + time.perf_counter() - t1
        size = size or image.size[0]
        if image_dir is not None:
            image.save(Path(image_dir) / f"{suite}_{i:04d}.png")
        verdicts[suite].append(verdict)
        records.append(
            {
                "suite": suite,
                "index": i,
                "prompt": prompt,
                "seed": seed + i,
                "all_correct": verdict.all_correct,
                "verdict": verdict.to_dict(),
            }
        )
        if progress is not None:
            progress(done, len(prompts))
    judge_report = None
    if judge_n and size:
        judge_report = {
            "clean": validate_judge(judge_n, degraded=False, size=size),
            "degraded": validate_judge(judge_n, degraded=True, size=size),
        }
    count = max(1, len(prompts))
    return {
        "suites": {s: _suite_metrics(vs) for s, vs in verdicts.items()},
        "overall": _suite_metrics([v for vs in verdicts.values() for v in vs]),
        "judge": judge_report,
        "records": records,
        "n": n,
        "seed": seed,
        "size": size,
        "seconds_per_image": gen_time / count,
        "judge_seconds_per_image": judge_time / count,
    }


# ---------------------------------------------------------------------------------------------
# Reports
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def format_report(result: dict[str, Any], failures: int = 10) -> str:
    """The markdown report of ``evaluate``'s result: the table, the judge's accuracy and up to
    ``failures`` failed prompts per suite with what went wrong."""
    lines = [
        f"# Prompt-following evaluation ({result['n']} prompts per suite, seed {result['seed']}, {result['size']} px)",
        "",
        "Accuracy in %; — where no prompt of the suite asks for it.",
        "",
        "| suite | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    rows = [*result["suites"].items(), ("overall", result["overall"])]
    lines += [f"| {name} | " + " | ".join(_pct(m[k]) for k in METRICS) + " |" for name, m in rows]
    lines += [
        "",
        f"Generation: {result['seconds_per_image']:.3f} s per image; "
        f"judge: {result['judge_seconds_per_image']:.4f} s per image.",
        "",
    ]
    if result.get("judge"):
        lines += [
            "## The judge's own accuracy (rendered ground truth)",
            "",
            "| images | n | color | shape | size | position | relation | background | overall | all correct |",
            "|---" * 10 + "|",
        ]
        for name, j in result["judge"].items():
            lines.append(
                f"| {name} | {j['n']} | "
                + " | ".join(
                    _pct(j[k])
                    for k in ("color", "shape", "size", "position", "relation", "background", "overall", "all_correct")
                )
                + " |"
            )
        deg = result["judge"]["degraded"]["degradation"]
        lines += [
            "",
            f"Degraded: per-object colour shift ±{deg['shift']:g} per channel, Gaussian blur radius "
            f"{deg['blur'][0]:g}–{deg['blur'][1]:g} px (at 64 px), noise σ {deg['noise']:g} levels.",
            "",
        ]
    for suite in result["suites"]:
        failed = [r for r in result["records"] if r["suite"] == suite and not r["all_correct"]]
        if not failed:
            continue
        lines += [f"## Failures: {suite} ({len(failed)})", ""]
        for r in failed[:failures]:
            seen = ", ".join(f"{d['size']} {d['color']} {d['shape']} at {d['cell']}" for d in r["verdict"]["detected"])
            lines.append(
                f"- seed {r['seed']}: “{r['prompt']}” — {'; '.join(r['verdict']['errors'])} "
                f"(seen: {seen or 'nothing'} on {r['verdict']['detected_background']})"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``eval.json`` (the whole result) and ``eval.md`` (``format_report``) into
    ``out_dir`` (created), each under a temporary name then renamed. Returns both paths."""
    out = Path(out_dir)
    text = format_report(result)  # before any write: a malformed result writes nothing
    payload = json.dumps(result, indent=1)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "eval.json", payload + "\n")
    _atomic_write(out / "eval.md", text)
    log.info("wrote %s and %s", out / "eval.json", out / "eval.md")
    return out / "eval.json", out / "eval.md"
