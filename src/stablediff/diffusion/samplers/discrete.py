"""Samplers defined on the discrete timesteps of a DDPM, written against the denoiser contract.

DDPM, DDIM, PLMS and LCM step between trained timesteps ``t -> t_prev`` of the VP process
``x_t = sqrt(ac) x0 + sqrt(1 - ac) eps``. Dividing by ``sqrt(ac)`` gives the VE frame the samplers
work in, ``x = x_t / sqrt(ac) = x0 + sigma eps`` with ``sigma = sqrt((1 - ac) / ac)``, so each update
is rewritten with ``sigma_t = sigmas[i]``, ``sigma_prev = sigmas[i + 1]`` and the denoiser's x0:

* DDIM (eta = 0): ``x_prev = x0 + sigma_prev * eps`` with ``eps = (x - x0) / sigma`` -- the Euler
  step of the probability-flow ODE in sigma.
* DDIM with eta / DDPM: the posterior variance of Song et al. eq. 16 becomes
  ``sigma_up**2 = eta**2 * sigma_prev**2 (sigma**2 - sigma_prev**2) / sigma**2``, i.e. the ancestral
  step of k-diffusion; eta = 1 is DDPM's "fixed_small" posterior q(x_prev | x_t, x0).
* PLMS: the pseudo linear multistep of Liu et al. (2022) combines the eps of past steps and makes
  a DDIM transfer with the combination.

The sigma lists come from ``plan.py`` (``sigmas[-1]`` may be ``sigma(alphas_cumprod[0])`` rather
than 0 when the schedule has ``set_alpha_to_one=False``, as SD's does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Callback, DenoiserFn, ancestral_step, distinct_steps, noise_like, report, sigma_batch, sigma_list


def _ddim_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    eta: float,
    extra_args: dict[str, Any] | None,
    callback: Callback | None,
    generator: torch.Generator | None,
    name: str,
) -> Tensor:
    args = extra_args or {}
    sig = sigma_list(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_prev = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma), **args)
        report(callback, i, x, sigma, sigma_prev, denoised)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_prev, eta)
        x = denoised + eps * sigma_down
        if sigma_up > 0:
            x = x + noise_like(x, generator, name) * sigma_up
    return x


@torch.no_grad()
def ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM of Song et al. (2020), eq. 12 with eta (diffusers DDIMScheduler, CompVis DDIMSampler)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _ddim_loop(denoiser, x, sigmas, eta, extra_args, callback, generator, "ddim")


@torch.no_grad()
def ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral DDPM sampling of Ho et al. (2020), posterior variance "fixed_small" (diffusers DDPMScheduler)."""
    return _ddim_loop(denoiser, x, sigmas, 1.0, extra_args, callback, generator, "ddpm")


@torch.no_grad()
def plms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PLMS / PNDM of Liu et al. (2022) as CompVis' PLMSSampler (diffusers PNDM, skip_prk_steps=True).

    The first step is a second-order (improved Euler) step in eps, costing one extra network call;
    then Adams-Bashforth combinations of orders 2, 3 and 4 of the eps at past steps. Zero-length
    steps (repeated sigmas) are skipped (``distinct_steps``).
    """
    args = extra_args or {}
    sig, index = distinct_steps(sigma_list(sigmas))
    n = len(sig) - 1
    history: list[Tensor] = []  # eps at the start of previous steps, newest last
    for i in range(n):
        sigma, sigma_prev = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma), **args)
        report(callback, index[i], x, sigma, sigma_prev, denoised)
        eps = (x - denoised) / sigma
        if not history and n > 1:
            # Pseudo improved Euler: eps at the DDIM prediction for t_prev, averaged with eps at t.
            x_pred = x + eps * (sigma_prev - sigma)
            eps_pred = (x_pred - denoiser(x_pred, sigma_batch(x, sigma_prev), **args)) / sigma_prev
            eps_prime = (eps + eps_pred) / 2
        elif not history:
            eps_prime = eps
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = [*history[-2:], eps]
        # DDIM transfer x_t -> x_prev with eps_prime (Liu et al. eq. 11), in the VE frame
        x = x + eps_prime * (sigma_prev - sigma)
    return x


@torch.no_grad()
def lcm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling of Luo et al. (2023) (diffusers LCMScheduler, k-diffusion ``sample_lcm``).

    Jump to the denoiser's x0, re-noise to the next level. For an LCM the denoiser must carry the
    consistency boundary condition (``denoiser.LCMBoundary``; ``SamplingPlan.wrap_denoiser`` adds it).
    """
    args = extra_args or {}
    sig = sigma_list(sigmas)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigma_batch(x, sig[i]), **args)
        report(callback, i, x, sig[i], sig[i + 1], denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + noise_like(x, generator, "lcm") * sig[i + 1]
    return x
