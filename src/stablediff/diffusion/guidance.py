"""The wrappers around a denoiser used at sampling time: classifier-free guidance (with its
rescale), LCM's boundary condition and latent-blending inpainting.

Each wraps a denoiser ``D(x, sigma, **cond) -> x0`` (see ``denoiser.py``) and is one itself, so
these are never code inside a sampler. All tensors: ``x`` is [B, ...] (any trailing shape),
``sigma`` is a float tensor [B] of noise levels >= 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .denoiser import Denoiser, SigmaToT, expand_like

# --------------------------------------------------------------------------------------------
# classifier-free guidance


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale of Lin et al. (2023), section 3.4, as diffusers' ``rescale_noise_cfg``.

    Rescales ``guided`` per sample to the standard deviation of the conditional prediction, then
    mixes: ``rescale * guided * std(cond) / std(guided) + (1 - rescale) * guided``.
    """
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser, one batched call per step.

    ``D(x, sigma, context=c, uncond_context=u, concat=None, y=None, uncond_y=None)``. The
    unconditional and conditional halves run as one batch ``[uncond, cond]`` (diffusers' order);
    contexts of different length run as two calls. ``y`` / ``uncond_y`` (SDXL's added
    conditioning) pair up like the contexts. When the wrapped object is a ``Denoiser``, guidance
    (and the rescale) is applied to the raw network output (eps or v) exactly as diffusers does,
    then turned into x0; any other denoiser is guided in x0 space (identical without rescale,
    since x0 is affine in eps).
    Like diffusers, ``scale <= 1`` disables guidance: only the conditional branch runs.
    """

    def __init__(self, denoiser: Callable[..., Tensor], scale: float, rescale: float = 0.0) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.rescale = float(rescale)

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        context: Tensor | None = None,
        uncond_context: Tensor | None = None,
        concat: Tensor | None = None,
        y: Tensor | None = None,
        uncond_y: Tensor | None = None,
    ) -> Tensor:
        # `y` is passed only when given, so denoisers without SDXL conditioning need not take it
        cond = {} if y is None else {"y": y}
        uncond = {} if y is None else {"y": uncond_y if uncond_y is not None else y}
        if self.scale <= 1.0 or uncond_context is None:
            return self.denoiser(x, sigma, context=context, concat=concat, **cond)
        raw = isinstance(self.denoiser, Denoiser)
        fn = self.denoiser.model_output if raw else self.denoiser
        if context is None or uncond_context.shape == context.shape:  # one batch of both
            both = torch.cat([uncond_context, context]) if context is not None else None
            y2 = {} if y is None else {"y": torch.cat([uncond["y"], y])}
            if context is not None and raw and self._shares_input():
                # One latent for both contexts: the network runs its layers before the first
                # cross-attention once (UNetModel's shared input), and the rest as a batch of two.
                out = fn(x, sigma, context=both, concat=concat, **y2)
            else:
                concat2 = torch.cat([concat, concat]) if concat is not None else None
                out = fn(torch.cat([x, x]), torch.cat([sigma, sigma]), context=both, concat=concat2, **y2)
            out_uncond, out_cond = out.chunk(2)
        else:
            out_uncond = fn(x, sigma, context=uncond_context, concat=concat, **uncond)
            out_cond = fn(x, sigma, context=context, concat=concat, **cond)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale > 0:
            guided = rescale_guidance(guided, out_cond, self.rescale)
        return self.denoiser.output_to_x0(guided, x, sigma) if raw else guided

    def _shares_input(self) -> bool:
        """Whether the wrapped network takes one input row for several context rows."""
        return getattr(self.denoiser.net, "shares_input_rows", False)


# --------------------------------------------------------------------------------------------
# LCM boundary condition


class LCMBoundary:
    """Consistency-model boundary condition of LCM (Luo et al. 2023), as diffusers' LCMScheduler.

    ``f(x, t) = c_skip(t) * x_t + c_out(t) * x0_pred`` with ``c_skip = sd^2 / ((k t)^2 + sd^2)``,
    ``c_out = k t / sqrt((k t)^2 + sd^2)`` (``k = timestep_scaling``, ``sd = sigma_data``) and
    ``x_t = x / sqrt(1 + sigma^2)`` the VP sample. It is part of the parameterisation of an LCM, so
    it wraps the (guided) denoiser; the ``lcm`` sampler then only re-noises.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        sigma_to_t: SigmaToT,
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
    ) -> None:
        self.denoiser = denoiser
        self.sigma_to_t = sigma_to_t
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        x0 = self.denoiser(x, sigma, **cond)
        t = self.sigma_to_t(sigma).to(torch.float64) * self.timestep_scaling
        sd2 = self.sigma_data**2
        c_skip = (sd2 / (t**2 + sd2)).to(device=x.device, dtype=x.dtype)
        c_out = (t / (t**2 + sd2) ** 0.5).to(device=x.device, dtype=x.dtype)
        x_t = x / expand_like((sigma.to(x.dtype) ** 2 + 1) ** 0.5, x)
        return expand_like(c_out, x) * x0 + expand_like(c_skip, x) * x_t


# --------------------------------------------------------------------------------------------
# inpainting with ordinary checkpoints


class InpaintDenoiser:
    """Latent blending for inpainting with an ordinary (4-channel) checkpoint.

    Before every network call after the first, the known region of the input is replaced by the
    original latent noised to the call's level: ``m * x + (1 - m) * (image + sigma * noise)``;
    ``finalize`` pastes the clean original after the last step. ``mask`` is 1 where new content is
    generated, 0 where the original is kept (diffusers' convention); ``noise`` is the unit-variance
    initial noise. Doing this in the denoiser rather than after each sampler step keeps samplers
    untouched: every sampler update is elementwise in x and D, so inside the generated region the
    result equals diffusers' post-step blending (binary masks); only the discarded known region of
    the sampler's own state differs. ``first_sigma`` (the start of the schedule) is left unblended,
    as diffusers does not blend before its first step.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        image_latents: Tensor,
        mask: Tensor,
        noise: Tensor,
        *,
        first_sigma: float | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.image_latents = image_latents
        self.mask = mask
        self.noise = noise
        self.first_sigma = first_sigma

    def blend(self, x: Tensor, sigma: Tensor) -> Tensor:
        known = self.image_latents + self.noise * expand_like(sigma.to(x.dtype), x)
        return self.mask * x + (1 - self.mask) * known

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if self.first_sigma is None or not bool((sigma == self.first_sigma).all()):
            x = self.blend(x, sigma)
        return self.denoiser(x, sigma, **cond)

    def finalize(self, x: Tensor, sigma_last: float = 0.0) -> Tensor:
        """Paste the clean original into the sampler's output (VE frame at ``sigma_last``)."""
        return self.mask * x + (1 - self.mask) * self.image_latents * math.sqrt(1 + sigma_last**2)
