"""The command line's add-on options: LoRAs and textual-inversion embeddings.

``--lora FILE[:SCALE]`` (repeatable; FILE may also be a name in ``--lora-dir``) loads a LoRA for
every image of the run; ``<lora:name:w>`` tags in the prompt are looked up in ``--lora-dir``.
``--embedding FILE`` (repeatable) loads an embedding named after its file; ``--embeddings-dir``
offers every embedding file there, loaded when its name appears in a prompt. A PNG made with
LoRAs loaded outside the prompt names them (and their hashes), and ``--from`` loads them again
from ``--lora-dir``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from stablediff.errors import printable
from stablediff.lora import lora_hash
from stablediff.lora.tags import LORA_SUFFIXES, find_lora


def add_addon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="apply a LoRA file (or a name in --lora-dir) with a weight (default 1); repeatable",
    )
    p.add_argument("--lora-dir", default=None, help="the folder of LoRA files <lora:name:w> tags name")
    p.add_argument(
        "--embedding", action="append", default=[], metavar="FILE", help="load a textual-inversion embedding"
    )
    p.add_argument("--embeddings-dir", default=None, help="a folder of embeddings, loaded when a prompt names one")


def lora_option(text: str, lora_dir: str | None) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (the file, the scale); FILE may be a path or a name in ``lora_dir``."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a colon inside the path (C:\...) and no scale
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text}: the scale must be a finite number")
    file = Path(path)
    if not file.is_file():
        if Path(path).suffix.lower() in LORA_SUFFIXES or lora_dir is None:
            raise ValueError(f"--lora {text}: no such file {path!r}")
        file = find_lora(path, lora_dir)
    return file, scale


def apply_addons(pipe, args: argparse.Namespace, stored_loras: list[dict] | None = None) -> None:
    """Load the LoRAs and embeddings the options (and a --from PNG's record) ask for into ``pipe``."""
    pipe.lora_dir = args.lora_dir
    pipe.embeddings_dir = args.embeddings_dir
    given = set()
    for text in args.lora:
        file, scale = lora_option(text, args.lora_dir)
        given.add(pipe.load_lora(file, scale))
    for use in stored_loras or []:
        if use["in_prompt"] or use["name"] in given:
            continue  # a prompt tag loads itself; the command line's choice wins
        file = find_lora(use["name"], args.lora_dir)
        if use["hash"] and lora_hash(file) != use["hash"]:
            print(
                f"stablediff: warning: LoRA {printable(str(file))} has hash {lora_hash(file)}, the PNG was made "
                f"with {printable(use['hash'])}: the image may differ",
                file=sys.stderr,
            )
        name = pipe.load_lora(file, use["unet"])
        if use["text"] != use["unet"]:
            pipe.set_lora_scale(name, use["unet"], use["text"])
    for file in args.embedding:
        pipe.load_embedding(file)
