"""stablediff: Stable Diffusion built from the ground up in PyTorch.

    import stablediff
    pipe = stablediff.load_pipeline("path/to/model.safetensors")   # or a diffusers folder, or a preset
    stablediff.save(pipe, "model-diffusers", layout="diffusers")
"""

__version__ = "0.1.0"

from stablediff.loading import load_pipeline, save  # noqa: E402
from stablediff.pipeline import StableDiffusion  # noqa: E402
from stablediff.presets import PRESETS, ModelSpec, infer_spec  # noqa: E402

__all__ = ["PRESETS", "ModelSpec", "StableDiffusion", "infer_spec", "load_pipeline", "save", "__version__"]
