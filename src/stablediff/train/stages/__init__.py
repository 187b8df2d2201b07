"""The training stages by name, imported only when asked for.

``STAGES`` maps each stage name to ``"module:Class"``; :func:`get_stage` imports that module then,
so a stage whose module is missing or broken does not break importing the others.
"""

from __future__ import annotations

import importlib
import inspect

STAGES: dict[str, str] = {
    "tokenizer": "stablediff.train.stages.tokenizer:TokenizerStage",
    "vae": "stablediff.train.stages.vae:VAEStage",
    "text": "stablediff.train.stages.text:TextStage",
    "unet": "stablediff.train.stages.unet:UNetStage",
    "finetune": "stablediff.train.stages.unet:FinetuneStage",
    # add-ons for an existing model (--base): they subclass the U-Net stages; no recipe runs them
    "lora": "stablediff.train.stages.lora:LoraStage",
    "embedding": "stablediff.train.stages.embedding:EmbeddingStage",
}
ADDONS = ("lora", "embedding")


def get_stage(name: str) -> type:
    """The class registered as `name`: a Stage subclass for the gradient stages; the tokenizer
    stage is not a gradient loop and has its own interface (``TokenizerStage(config).fit(out)``).
    If the module has no class of the registered name, the class defined there whose ``name``
    attribute is `name` is taken."""
    if name not in STAGES:
        raise ValueError(f"unknown training stage {name!r}; stages are {', '.join(STAGES)}")
    module_name, _, class_name = STAGES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"training stage {name!r} is not available: cannot import {module_name} ({err})") from err
    found = getattr(module, class_name, None)
    if not inspect.isclass(found):
        candidates = [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and obj.__module__ == module_name and getattr(obj, "name", "") == name
        ]
        if len(candidates) != 1:
            raise ValueError(f"training stage {name!r}: {module_name} defines no class {class_name!r}")
        found = candidates[0]
    return found


__all__ = ["ADDONS", "STAGES", "get_stage"]
