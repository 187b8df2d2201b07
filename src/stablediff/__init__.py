"""stablediff: Stable Diffusion built from the ground up in PyTorch.

    import stablediff
    pipe = stablediff.load_pipeline()                       # the bundled model; or a checkpoint path
    image = pipe.generate(stablediff.GenerationParams("a red circle above a blue square", width=64, height=64))[0]
    image.save("circle.png")
"""

__version__ = "0.1.0"

from stablediff.loading import load_pipeline, save  # noqa: E402
from stablediff.params import GenerationParams  # noqa: E402
from stablediff.pipeline import StableDiffusion  # noqa: E402
from stablediff.presets import PRESETS, ModelSpec, infer_spec  # noqa: E402

__all__ = ["PRESETS", "GenerationParams", "ModelSpec", "StableDiffusion", "infer_spec", "load_pipeline", "save",
           "__version__"]  # fmt: skip
