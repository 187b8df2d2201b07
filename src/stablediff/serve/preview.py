"""The cheap latent preview: a linear latent -> RGB projection (a 3 x C matrix and a bias), as the
popular web UIs' "approx cheap" preview.

`fit_projection` fits it per model by least squares when the model loads: a few random latents
are decoded by the model's own VAE (two 8 x 8 latents: a fraction of a second), each
image is average-pooled to the latent grid, and ``rgb = W @ z + b`` is solved over every pixel.
The pipeline hands the worker each step's estimate of the final latents (the denoiser's x0, so the
preview shows the image taking shape, not the noise), and `preview_png` turns one into a small PNG.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image


@torch.no_grad()
def fit_projection(pipe, n: int = 2, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [3, C], b [3]) mapping a scaled latent pixel to RGB in [-1, 1], fitted on ``n`` random
    ``size`` x ``size`` latents decoded by ``pipe``."""
    channels, factor = pipe.spec.vae.z_channels, pipe.spec.vae.downscale
    z = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    images = pipe.decode(z).float().cpu()  # [n, 3, size * factor, size * factor]
    pooled = F.avg_pool2d(images, factor)  # [n, 3, size, size]
    x = z.permute(0, 2, 3, 1).reshape(-1, channels)
    y = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution.float()  # [C + 1, 3]
    return solution[:channels].T.contiguous(), solution[channels]


def project(latent: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Image.Image:
    """One latent [C, h, w] -> an RGB image of h x w pixels."""
    rgb = torch.einsum("kc,chw->khw", weight, latent.float().cpu()) + bias[:, None, None]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def preview_png(latent: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, min_side: int = 64) -> bytes:
    """A PNG preview of a latent, scaled up (nearest) so that its short side is at least ``min_side``."""
    image = project(latent, weight, bias)
    scale = max(1, -(-min_side // min(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
