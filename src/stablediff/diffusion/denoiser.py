"""Denoisers: the sampler contract ``D(x, sigma, **cond) -> x0`` and the wrappers around it.

A sampler sees only a denoiser. ``Denoiser`` adapts a discrete-time network
``net(x_t, t, context, concat=None) -> eps | v | x0`` to that contract with the preconditioning of
Karras et al. (2022), written as one scaling object per parameterisation (as in sgm's
``denoiser_scaling.py``)::

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * net(c_in(sigma) * x, c_noise(sigma))

``x`` is the VE-frame latent ``x0 + sigma * eps``; ``c_in * x = x / sqrt(1 + sigma**2)`` is the
network's VP input ``x_t``, and ``c_noise`` is the discrete timestep whose noise level is ``sigma``.

Classifier-free guidance, LCM's boundary condition and inpainting are wrappers around a denoiser,
never code inside a sampler. All tensors: ``x`` is [B, ...] (any trailing shape), ``sigma`` is a
float tensor [B] of noise levels >= 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .schedules import NoiseSchedule

PREDICTION_TYPES = ("eps", "v", "x0")
# diffusers' names are accepted too
_PREDICTION_ALIASES = {
    "eps": "eps",
    "epsilon": "eps",
    "v": "v",
    "v_prediction": "v",
    "x0": "x0",
    "sample": "x0",
}

SigmaToT = Callable[[Tensor], Tensor]


def canonical_prediction_type(name: str) -> str:
    """Map ``eps``/``epsilon``, ``v``/``v_prediction``, ``x0``/``sample`` to ``eps``/``v``/``x0``."""
    try:
        return _PREDICTION_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown prediction type {name!r}; valid choices: {', '.join(_PREDICTION_ALIASES)}") from None


def _expand(c: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against x."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


# --------------------------------------------------------------------------------------------
# parameterisations


class _Scaling:
    """Base: ``__call__(sigma) -> (c_skip, c_out, c_in, c_noise)``, each shaped like ``sigma``.

    ``c_noise`` maps sigma to the network's noise conditioning; for the discrete SD networks that is
    the timestep, so pass the schedule's ``sigma_to_t`` (identity by default, as in EDM).
    """

    prediction_type = ""

    def __init__(self, c_noise: SigmaToT | None = None) -> None:
        self.c_noise = c_noise

    def _noise(self, sigma: Tensor) -> Tensor:
        if self.c_noise is None:
            return sigma
        return self.c_noise(sigma).to(device=sigma.device, dtype=torch.float32)

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError


class EpsScaling(_Scaling):
    """The network predicts the noise: ``x0 = x - sigma * eps``."""

    prediction_type = "eps"

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return torch.ones_like(sigma), -sigma, c_in, self._noise(sigma)


class VScaling(_Scaling):
    """The network predicts ``v = sqrt(ac) eps - sqrt(1 - ac) x0`` (Salimans & Ho 2022)."""

    prediction_type = "v"

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1) ** 0.5
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return c_skip, c_out, c_in, self._noise(sigma)


class X0Scaling(_Scaling):
    """The network predicts the clean sample directly."""

    prediction_type = "x0"

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, self._noise(sigma)


SCALINGS: dict[str, type[_Scaling]] = {"eps": EpsScaling, "v": VScaling, "x0": X0Scaling}


class Denoiser:
    """Discrete-time network -> denoiser ``D(x, sigma, context=None, concat=None) -> x0``.

    ``net(x_t, t, context, concat=None)``: ``x_t`` [B, C, H, W] in the VP frame, ``t`` float32 [B] in
    [0, T-1]. ``sigma_to_t`` decides the timestep fed for a noise level: by default the schedule's
    log-sigma interpolation (fractional t, as k-diffusion); a ``SamplingPlan.sigma_to_t`` reproduces
    exactly the timesteps the matching diffusers scheduler passes (see ``samplers.plan``).
    ``net_dtype``: when set, the network input is cast to it and its output back to ``x.dtype``.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction_type: str = "eps",
        *,
        sigma_to_t: SigmaToT | None = None,
        net_dtype: torch.dtype | None = None,
    ) -> None:
        self.net = net
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.sigma_to_t = sigma_to_t if sigma_to_t is not None else schedule.sigma_to_t
        self.scaling = SCALINGS[self.prediction_type](c_noise=self.sigma_to_t)
        self.net_dtype = net_dtype

    def model_output(
        self, x: Tensor, sigma: Tensor, context: Tensor | None = None, concat: Tensor | None = None
    ) -> Tensor:
        """The raw network prediction (eps, v or x0) for VE input ``x`` at noise level ``sigma``."""
        return self._net_output(x, self.scaling(sigma), context, concat)

    def output_to_x0(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """Combine a raw prediction with the input: ``c_skip * x + c_out * out``."""
        return self._combine(out, x, self.scaling(sigma))

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor | None = None, concat: Tensor | None = None) -> Tensor:
        scalings = self.scaling(sigma)
        return self._combine(self._net_output(x, scalings, context, concat), x, scalings)

    def _net_output(
        self, x: Tensor, scalings: tuple[Tensor, ...], context: Tensor | None, concat: Tensor | None
    ) -> Tensor:
        _, _, c_in, c_noise = scalings
        x_in = x * _expand(c_in, x).to(x.dtype)
        if self.net_dtype is not None:
            x_in = x_in.to(self.net_dtype)
            concat = concat.to(self.net_dtype) if concat is not None else None
            context = context.to(self.net_dtype) if context is not None else None
        return self.net(x_in, c_noise, context, concat=concat).to(x.dtype)

    @staticmethod
    def _combine(out: Tensor, x: Tensor, scalings: tuple[Tensor, ...]) -> Tensor:
        c_skip, c_out = scalings[0], scalings[1]
        return x * _expand(c_skip, x).to(x.dtype) + out * _expand(c_out, x).to(x.dtype)


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

    ``D(x, sigma, context=c, uncond_context=u, concat=None)``. The unconditional and conditional
    halves run as one batch ``[uncond, cond]`` (diffusers' order); contexts of different length run
    as two calls. When the wrapped object is a ``Denoiser``, guidance (and the rescale) is applied to
    the raw network output (eps or v) exactly as diffusers does, then turned into x0; any other
    denoiser is guided in x0 space (identical without rescale, since x0 is affine in eps).
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
    ) -> Tensor:
        if self.scale <= 1.0 or uncond_context is None:
            return self.denoiser(x, sigma, context=context, concat=concat)
        raw = isinstance(self.denoiser, Denoiser)
        fn = self.denoiser.model_output if raw else self.denoiser
        if context is None or uncond_context.shape == context.shape:
            both = torch.cat([uncond_context, context]) if context is not None else None
            concat2 = torch.cat([concat, concat]) if concat is not None else None
            out = fn(torch.cat([x, x]), torch.cat([sigma, sigma]), context=both, concat=concat2)
            out_uncond, out_cond = out.chunk(2)
        else:
            out_uncond = fn(x, sigma, context=uncond_context, concat=concat)
            out_cond = fn(x, sigma, context=context, concat=concat)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale > 0:
            guided = rescale_guidance(guided, out_cond, self.rescale)
        return self.denoiser.output_to_x0(guided, x, sigma) if raw else guided


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
        x_t = x / _expand((sigma.to(x.dtype) ** 2 + 1) ** 0.5, x)
        return _expand(c_out, x) * x0 + _expand(c_skip, x) * x_t


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
        known = self.image_latents + self.noise * _expand(sigma.to(x.dtype), x)
        return self.mask * x + (1 - self.mask) * known

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if self.first_sigma is None or not bool((sigma == self.first_sigma).all()):
            x = self.blend(x, sigma)
        return self.denoiser(x, sigma, **cond)

    def finalize(self, x: Tensor, sigma_last: float = 0.0) -> Tensor:
        """Paste the clean original into the sampler's output (VE frame at ``sigma_last``)."""
        return self.mask * x + (1 - self.mask) * self.image_latents * math.sqrt(1 + sigma_last**2)


# --------------------------------------------------------------------------------------------
# training side


def _ac_at(t: Tensor, alphas_cumprod: Tensor, like: Tensor) -> Tensor:
    ac = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t.long()]
    return ac.reshape(ac.shape + (1,) * (like.ndim - ac.ndim)).to(like.dtype)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process ``x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise`` (Ho et al. 2020, eq. 4).

    ``x0``, ``noise``: [B, ...]; ``t``: integer timesteps [B] in [0, T-1]; returns [B, ...].
    """
    ac = _ac_at(t, alphas_cumprod, x0)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def training_target(prediction_type: str, x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Regression target for a network of the given prediction type: eps, v or x0 ([B, ...])."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    ac = _ac_at(t, alphas_cumprod, x0)
    return ac.sqrt() * noise - (1 - ac).sqrt() * x0


def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ``ac / (1 - ac)`` at integer timesteps ``t`` [B] -> float32 [B]."""
    ac = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t.long()]
    return ac / (1 - ac)


def min_snr_gamma_weights(t: Tensor, alphas_cumprod: Tensor, gamma: float, prediction_type: str,
                          floor: float = 0.0) -> Tensor:  # fmt: skip
    """Per-sample MSE weights of Min-SNR-gamma (Hang et al. 2023), float32 [B].

    ``min(SNR, gamma)`` turned into a weight for the network's own target: divided by SNR for eps,
    by SNR + 1 for v, unchanged for x0 (diffusers' training scripts). Zero-SNR timesteps (eps) get 1.
    `floor` also bounds the x0 weight from below, ``clamp(SNR, floor, gamma)`` (``gamma = inf``:
    the floor alone; Salimans & Ho's truncated SNR is floor 1).
    """
    kind = canonical_prediction_type(prediction_type)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not 0 <= floor <= gamma:
        raise ValueError(f"floor must be in [0, gamma={gamma}], got {floor}")
    s = snr(t, alphas_cumprod)
    clipped = s.clamp(min=floor, max=gamma)
    if kind == "eps":
        weights = clipped / s
        return torch.where(s == 0, torch.ones_like(weights), weights)
    if kind == "v":
        return clipped / (s + 1)
    return clipped
