"""AUTOMATIC1111's LoRA prompt syntax: ``<lora:name>``, ``<lora:name:0.8>``, ``<lora:name:te:unet>``
(or ``te=`` / ``unet=``), and finding ``name`` in a LoRA folder.

A1111 (extensions-builtin/Lora) takes the tags out of the prompt before it is encoded; the first
number weights the text encoder and, unless a second one is given, the U-Net too. ``<lyco:...>``
is the older LyCORIS extension's spelling of the same tag. Names are file stems, looked up in the
folder and its subfolders (as A1111 does).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LORA_SUFFIXES", "LoraTag", "find_lora", "parse_lora_tags"]

_TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)  # A1111: <(\w+):([^>]+)>, kinds lora and lyco
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class LoraTag:
    """One tag: the LoRA's name, its U-Net weight and its text-encoder weight."""

    name: str
    unet: float = 1.0
    text: float = 1.0

    def to_prompt(self) -> str:
        """The tag as A1111 writes it (one number when both weights are equal)."""
        weights = f"{_num(self.text)}" if self.text == self.unet else f"{_num(self.text)}:{_num(self.unet)}"
        return f"<lora:{self.name}:{weights}>"


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its LoRA tags, the tags in order). A bad tag is a ValueError naming it;
    a name given twice is refused (which weight would be meant?)."""
    tags: list[LoraTag] = []
    for match in _TAG.finditer(prompt):
        tags.append(_parse(match.group(0), match.group(2)))
    names = [t.name for t in tags]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"the prompt names the LoRA {twice[0]!r} in more than one <lora:...> tag")
    return _TAG.sub("", prompt), tags


def _parse(tag: str, body: str) -> LoraTag:
    positional, named = [], {}
    for item in body.split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named[key.strip()] = value
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise ValueError(f"{tag}: a LoRA tag needs a name, as in <lora:name:0.8>")
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise ValueError(f"{tag}: unknown option {unknown[0]!r}; A1111's are te=, unet= and dyn=")
    if "dyn" in named:
        raise ValueError(f"{tag}: dyn= (dynamic LoRA rank) is not supported")
    text = _weight(tag, named.get("te", positional[1] if len(positional) > 1 else "1"))
    unet = _weight(tag, named.get("unet", positional[2] if len(positional) > 2 else str(text)))
    return LoraTag(name, unet=unet, text=text)


def _weight(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{tag}: the weight {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{tag}: the weight must be finite, got {text.strip()!r}")
    return value


def _num(value: float) -> str:
    return f"{value:g}"


def find_lora(name: str, folder: str | os.PathLike[str] | None) -> Path:
    """The file of the LoRA ``name`` in ``folder`` (or its subfolders): a ``.safetensors``, ``.pt``
    or ``.ckpt`` whose stem is ``name``. ValueError naming the folder when there is none, or more
    than one."""
    if folder is None:
        raise ValueError(f"the prompt names the LoRA {name!r}: give the folder of LoRA files (--lora-dir)")
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"LoRA folder {root} does not exist")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"LoRA name {name!r} must be a file stem, without folders")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.stem == name and p.is_file())
    if not found:
        raise ValueError(f"no LoRA named {name!r} in {root} (looked for {name}{{{', '.join(LORA_SUFFIXES)}}})")
    if len(found) > 1:
        raise ValueError(f"{len(found)} files in {root} are named {name!r}: {', '.join(map(str, found[:4]))}")
    return found[0]
