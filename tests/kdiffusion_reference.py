"""k-diffusion's own `sampling.py` and `external.py` (k-diffusion 0.1.1.post1, installed by `make setup`
with `--no-deps`), loaded without the package's `__init__`, which imports torchvision, clip and more.

They are executed as submodules of a stand-in package `k_diffusion` whose `utils` holds the one helper
they call (`append_dims`, as in k_diffusion/utils.py). The stand-ins live in `sys.modules` only while
the modules load; the loaded modules keep what they imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import torch

VERSION = "0.1.1.post1"
_loaded: dict[str, types.ModuleType] = {}


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """k_diffusion.utils.append_dims: trailing singleton dimensions up to ``target_dims``."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external) from the installed package's folder."""
    if not _loaded:
        spec = importlib.util.find_spec("k_diffusion")  # finds the folder without running __init__
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"k-diffusion=={VERSION} is not installed: run `make setup` (it installs it --no-deps)")
        installed = importlib.metadata.version("k-diffusion")
        if installed != VERSION:
            raise RuntimeError(f"k-diffusion {installed} is installed; the reference is {VERSION} (`make setup`)")
        folder = Path(next(iter(spec.submodule_search_locations)))
        package = types.ModuleType("k_diffusion")
        package.__path__ = [str(folder)]
        utils = types.ModuleType("k_diffusion.utils")
        utils.append_dims = append_dims
        package.utils = utils
        names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "k_diffusion.external")
        saved = {name: sys.modules.get(name) for name in names}
        sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
        try:
            for name in ("sampling", "external"):
                spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", folder / f"{name}.py")
                module = importlib.util.module_from_spec(spec)
                sys.modules[f"k_diffusion.{name}"] = module
                setattr(package, name, module)
                spec.loader.exec_module(module)
                _loaded[name] = module
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    return _loaded["sampling"], _loaded["external"]
