"""stablediff: Stable Diffusion built from the ground up in PyTorch.

import stablediff
pipe = stablediff.load_pipeline()                       # the bundled model; or a checkpoint path
image = pipe.generate(stablediff.GenerationParams("a red circle above a blue square"))[0]  # the model's size
image.save("circle.png")
"""

from stablediff.loading import load_pipeline, save
from stablediff.params import GenerationParams
from stablediff.pipeline import StableDiffusion
from stablediff.presets import PRESETS, ModelSpec, infer_spec
from stablediff.version import __version__

__all__ = [
    "PRESETS",
    "GenerationParams",
    "ModelSpec",
    "StableDiffusion",
    "infer_spec",
    "load_pipeline",
    "save",
    "__version__",
]
