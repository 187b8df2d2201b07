"""The command line's SDXL options, and the timestep-spacing override any model takes.

``--prompt-2`` / ``--negative-2`` (the second text tower's prompts), ``--original-size`` /
``--target-size HxW`` and ``--crops TOP,LEFT`` (micro-conditioning), ``--aesthetic-score`` /
``--negative-aesthetic-score`` (a refiner's), and, for ``generate``, ``--refiner MODEL
[--switch-at 0.8]``: the base denoises to the switch (``denoising_end``) and the refiner continues
its latents from there (``denoising_start``), as docs/sdxl.md shows in Python. Each is an error,
named by its flag, for a model that would not use it. ``--spacing`` replaces the timestep spacing
of the model's scheduler config for the run (SDXL-Turbo and SD-Turbo ship "trailing").
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from stablediff.diffusion import SPACINGS
from stablediff.loading import BUNDLED_NAME, PRESETS
from stablediff.params import GenerationParams
from stablediff.presets import ModelSpec

SWITCH_AT = 0.8  # diffusers' example and A1111's default hand-off


def _pair(pattern: str, form: str, low: int) -> Callable[[str], tuple[int, int]]:
    """An argparse type: two integers >= ``low`` written as ``form`` (e.g. HxW)."""

    def parse(text: str) -> tuple[int, int]:
        match = re.fullmatch(pattern, text.strip())
        if match is None or min(int(match[1]), int(match[2])) < low:
            raise argparse.ArgumentTypeError(f"must be {form} with integers >= {low}, got {text!r}")
        return int(match[1]), int(match[2])

    return parse


# GenerationParams fields and their flags (None: not given, so that --from can fill them).
SDXL_FLAGS = {
    "prompt_2": ("--prompt-2", str, "SDXL: the prompt of the second text encoder (default: the prompt)"),
    "negative_prompt_2": ("--negative-2", str, "SDXL: the second text encoder's negative prompt"),
    "original_size": (
        "--original-size",
        _pair(r"(\d+)x(\d+)", "HEIGHTxWIDTH", 1),
        "SDXL micro-conditioning: the size HxW the image claims to come from (default: the image size)",
    ),
    "target_size": ("--target-size", _pair(r"(\d+)x(\d+)", "HEIGHTxWIDTH", 1), "SDXL base: the target size HxW"),
    "crops_coords_top_left": (
        "--crops",
        _pair(r"(\d+)\s*,\s*(\d+)", "TOP,LEFT", 0),
        "SDXL micro-conditioning: the crop's top-left corner TOP,LEFT (default 0,0)",
    ),
    "aesthetic_score": ("--aesthetic-score", float, "SDXL refiner: the aesthetic score (default 6)"),
    "negative_aesthetic_score": ("--negative-aesthetic-score", float, "SDXL refiner: the negative's (2.5)"),
}
# What an SDXL refiner alone does not read: it has one tower (reading the prompt) and the aesthetic
# score in place of the target size.
_BASE_ONLY = ("prompt_2", "negative_prompt_2", "target_size")
_REFINER_ONLY = ("aesthetic_score", "negative_aesthetic_score")
FLAG_FIELDS = (*SDXL_FLAGS, "spacing")  # the GenerationParams fields this module's flags set


def add_sdxl_args(p: argparse.ArgumentParser, kind: str) -> None:
    metavars = {"original_size": "HxW", "target_size": "HxW", "crops_coords_top_left": "TOP,LEFT"}
    for name, (flag, typ, text) in SDXL_FLAGS.items():
        p.add_argument(flag, dest=name, type=typ, default=None, metavar=metavars.get(name), help=text)
    p.add_argument(
        "--spacing",
        choices=SPACINGS,
        default=None,
        help="timestep spacing in place of the model's scheduler config (Turbo models: trailing)",
    )
    if kind == "generate":
        p.add_argument("--refiner", default=None, metavar="MODEL", help="SDXL: a refiner that takes over the latents")
        p.add_argument(
            "--switch-at",
            dest="switch_at",
            type=float,
            default=None,
            help=f"with --refiner: the fraction of the schedule the base runs (default {SWITCH_AT})",
        )


def refiner_choice(args: argparse.Namespace, stored: dict | None, stored_file: str | None) -> tuple[str | None, float]:
    """The refiner to run and its switch: the command line's, else a --from PNG's record
    (``stored``, its model file found as ``stored_file``)."""
    refiner = getattr(args, "refiner", None)
    switch = getattr(args, "switch_at", None)
    if stored is not None:
        refiner = refiner or stored_file
        switch = stored["switch_at"] if switch is None else switch
    if switch is not None and refiner is None:
        raise ValueError("--switch-at needs --refiner MODEL (the model that takes over at the switch)")
    switch = SWITCH_AT if switch is None else switch
    if not 0.0 < switch < 1.0:
        raise ValueError(f"--switch-at must be in (0, 1) (the fraction of the schedule the base runs), got {switch}")
    # known before the base model is loaded (a file's spec may be known only once it is read)
    if refiner is not None and refiner not in PRESETS and refiner != BUNDLED_NAME and not Path(refiner).exists():
        raise ValueError(f"--refiner {refiner!r} is neither an existing file or folder nor a preset")
    return refiner, switch


def check_sdxl_options(args: argparse.Namespace, spec: ModelSpec, refiner: ModelSpec | None) -> None:
    """A ValueError naming the first SDXL flag that the model (and the refiner, when one follows
    it) would not use."""
    model = args.model or spec.name
    given = [name for name in SDXL_FLAGS if getattr(args, name, None) is not None]
    flags = [SDXL_FLAGS[name][0] for name in given]
    if getattr(args, "refiner", None) is not None:
        flags.append("--refiner")
    if not spec.is_sdxl and (flags or refiner is not None):
        flag = flags[0] if flags else "--refiner (from the PNG)"
        raise ValueError(f"{flag} is an SDXL option, and {model!r} is not an SDXL model")
    if refiner is not None:
        name = getattr(args, "refiner", None) or refiner.name
        if spec.is_refiner:
            raise ValueError(f"--refiner: {model!r} is an SDXL refiner itself; pass the SDXL base as --model")
        if not refiner.is_sdxl:
            raise ValueError(f"--refiner: {name!r} is not an SDXL model")
        if (refiner.vae.z_channels, refiner.vae.scaling_factor) != (spec.vae.z_channels, spec.vae.scaling_factor):
            raise ValueError(
                f"--refiner: {name!r} has a different latent space from {model!r} (channels and scale "
                f"{refiner.vae.z_channels}, {refiner.vae.scaling_factor} vs {spec.vae.z_channels}, "
                f"{spec.vae.scaling_factor}): it cannot continue its latents"
            )
        return
    for name in given:
        if name in _REFINER_ONLY and not spec.is_refiner:
            raise ValueError(
                f"{SDXL_FLAGS[name][0]} conditions an SDXL refiner; {model!r} is an SDXL base (add --refiner MODEL)"
            )
        if name in _BASE_ONLY and spec.is_refiner:
            raise ValueError(
                f"{SDXL_FLAGS[name][0]} is not used by an SDXL refiner ({model!r} reads the prompt with its one "
                "text encoder and has the aesthetic score in place of the target size)"
            )


def generate_refined(
    base,
    refiner,
    params: GenerationParams,
    switch: float,
    callback: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """``base.generate(params)`` without a refiner. With one, the base denoises to ``switch`` and
    the refiner continues its latents from there and decodes, with the base's VAE tiling (diffusers'
    ``denoising_end`` / ``denoising_start`` hand-off). Progress counts the base's steps then the
    refiner's."""
    if refiner is None:
        return base.generate(params, callback=callback)
    refiner.vae_tiling = base.vae_tiling
    done = 0

    def base_step(step: int, total: int) -> None:
        nonlocal done
        done = total
        if callback is not None:
            callback(step, total)

    def refiner_step(step: int, total: int) -> None:
        if callback is not None:
            callback(done + step, done + total)

    latents = base.sample_latents(replace(params, denoising_start=None, denoising_end=switch), base_step)
    if not torch.isfinite(latents).all():
        raise ValueError(f"the base model's latents became non-finite (NaN or inf) before the switch at {switch}")
    handed = replace(params, denoising_start=switch, denoising_end=None)
    return refiner.generate(handed, callback=refiner_step, init_latents=latents)
