"""The options of the generation commands (generate, img2img, inpaint): the GenerationParams
flags, the model and output options, and those of the add-ons (cli_addons) and SDXL (cli_sdxl)."""

from __future__ import annotations

import argparse

import torch

from stablediff.cli_addons import add_addon_args
from stablediff.cli_sdxl import FLAG_FIELDS, add_sdxl_args
from stablediff.diffusion import SAMPLERS
from stablediff.params import SCHEDULES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# GenerationParams fields and their flags; None means "not given" so that --from can fill them.
PARAM_FLAGS = {
    "negative_prompt": ("--negative", str, "what the image should not show"),
    "width": ("--width", int, "image width in pixels, a multiple of 8"),
    "height": ("--height", int, "image height in pixels, a multiple of 8"),
    "steps": ("--steps", int, "sampler steps"),
    "guidance_scale": ("--cfg", float, "classifier-free guidance scale (1 disables guidance)"),
    "guidance_rescale": ("--rescale", float, "guidance rescale in [0, 1]"),
    "sampler": ("--sampler", str, f"one of: {', '.join(SAMPLERS)}"),
    "schedule": ("--schedule", str, f"sigma schedule: {', '.join(SCHEDULES)}"),
    "seed": ("--seed", int, "random seed (default: a random one, recorded in the PNG)"),
    "batch_size": ("--batch", int, "images per run; image k uses seed + k"),
    "clip_skip": ("--clip-skip", int, "1 = the model's own text layer, 2 = one earlier, ..."),
    "strength": ("--strength", float, "img2img/inpaint: fraction of the schedule re-run, in [0, 1]"),
}
OPTION_FIELDS = (*PARAM_FLAGS, *FLAG_FIELDS)  # every GenerationParams field a flag sets


def add_generation_args(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (see docs/prompts.md for (word:1.3))")
    for name, (flag, typ, text) in PARAM_FLAGS.items():
        if name == "strength" and kind == "generate":
            continue
        p.add_argument(flag, dest=name, type=typ, default=None, help=text)
    if kind != "generate":
        p.add_argument("--init", dest="init_image", required=kind != "generate", help="input image")
    if kind == "inpaint":
        p.add_argument("--mask", required=True, help="mask image: white = repaint, black = keep")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint file, diffusers folder or preset (default: $STABLEDIFF_MODEL or the bundled model)",
    )
    p.add_argument(
        "--from",
        dest="from_png",
        default=None,
        help="take every parameter from a PNG (ours, or A1111's: what it cannot reproduce is listed)",
    )
    if kind == "generate":
        p.add_argument(
            "--prompts",
            default=None,
            metavar="FILE",
            help="a prompt per line (.txt) or GenerationParams per line (.jsonl), the other options as defaults; "
            "resumes; split over processes under torchrun",
        )
    add_addon_args(p)
    add_sdxl_args(p, kind)
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (under torchrun: each rank its own GPU)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the U-Net (torch.compile, weights frozen): faster steps after a first run of each size "
        "that compiles (cached on disk, docs/benchmarks.md); no LoRAs",
    )
    p.add_argument(
        "--vae-tiling",
        choices=("auto", "always", "never"),
        default="auto",
        help="decode (and encode) the image in tiles: auto = when it would not fit in memory (docs/memory.md)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the estimated peak memory and the memory available, and exit without generating",
    )
