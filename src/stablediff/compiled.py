"""The U-Net compiled for inference: torch.compile (inductor) with its weights frozen into the graph,
the generated code cached on disk so that only a machine's first run pays for compiling.

Freezing lets inductor fold the weights as constants (oneDNN pre-packs them, and fuses what it can
around them), so a compiled U-Net must not see its weights change: LoRAs are refused once it is
compiled (`AddOns`). A new latent size or dtype compiles again (and is cached too). docs/benchmarks.md
has the first-call time and the speed against eager.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stablediff.models.unet import UNetModel

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own setting, honoured when set


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stablediff" / "inductor"


def compile_unet(unet: UNetModel, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Compile ``unet`` in place (its state dict and attributes stay as they are); inference only.
    ``cache_dir``: where inductor keeps the compiled code (default: $TORCHINDUCTOR_CACHE_DIR, else
    ~/.cache/stablediff/inductor)."""
    if is_compiled(unet):
        return
    if cache_dir is not None or CACHE_ENV not in os.environ:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_ENV] = str(folder)  # read by inductor whenever it looks up its cache
    unet.eval()
    # A new size is a new graph: dynamic shapes would give slower kernels for the sizes people use.
    unet.compile(dynamic=False, options={"freezing": True})


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
