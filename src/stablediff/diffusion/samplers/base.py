"""Plumbing shared by the sampler functions: the denoiser/callback types, noise, sigma batches.

Every sampler is a pure function ``(denoiser, x, sigmas, *, extra_args, callback, generator,
**options) -> x``: ``x`` [B, ...] is the VE-frame latent at noise level ``sigmas[0]``, ``sigmas`` a
descending float tensor [n + 1] (usually ending with 0), and the result is the latent at
``sigmas[-1]``. ``generator``: one torch.Generator, or one per row of ``x`` (``noise_like``).
Scalar step arithmetic is done on Python floats (the float32 sigma values, exactly),
which keeps every step free of device synchronisation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

DenoiserFn = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]


def sigma_list(sigmas: Tensor) -> list[float]:
    """The sigma schedule as Python floats (float32 values, exactly), validated."""
    if sigmas.ndim != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be a 1-d tensor with at least one element, got shape {tuple(sigmas.shape)}")
    values = [float(v) for v in sigmas.detach().to("cpu", torch.float32)]
    if any(b > a for a, b in itertools.pairwise(values)) or values[-1] < 0:
        raise ValueError("sigmas must be non-increasing and non-negative")
    return values


def distinct_steps(sig: list[float]) -> tuple[list[float], list[int]]:
    """The sigma list without zero-length steps, and the index of each remaining step in ``sig``.

    A repeated sigma is a step of length zero: nothing to integrate, but multistep solvers divide
    by step lengths (DPM-Solver++'s ratio of steps, UniPC's, LMS's Lagrange nodes). Repeats come from
    integer timesteps spaced closer than 1 (DPM-Solver/UniPC at T steps: diffusers then returns NaN).
    Dropping them gives the solve over the distinct sigmas. Step k of the result completes steps up
    to ``index[k]`` of ``sig`` (the zero-length ones after it included), the number the callback
    reports, so the last step still reports ``len(sig) - 2``."""
    values, index = [sig[0]], []
    for i in range(1, len(sig)):
        if sig[i] != sig[i - 1]:
            values.append(sig[i])
            index.append(i - 1)
        elif index:
            index[-1] = i - 1
    return values, index


def f32(value: float) -> float:
    """Round a Python float to the nearest float32, so that a sigma computed inside a sampler is the
    same number in the step arithmetic and in the float32 tensor handed to the denoiser."""
    return float(torch.tensor(value, dtype=torch.float32))


def sigma_batch(x: Tensor, sigma: float) -> Tensor:
    """Noise level ``sigma`` as a float32 tensor [B] on x's device (float32 even for half x, so that
    timestep look-ups are exact)."""
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def noise_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None, sampler: str) -> Tensor:
    """Standard normal noise shaped like x, drawn in float32 on the generator's device (the CPU for
    the usual CPU generator, so a seed gives the same image on any device), then moved to x.
    A sequence of generators draws row k of the batch from generator k (as diffusers does with a
    list), so each image's noise is what a batch of one with its generator would get."""
    if generator is None:
        raise ValueError(f"sampler {sampler!r} is stochastic: pass an explicit torch.Generator")
    if isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=generator.device)
        return noise.to(device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"sampler {sampler!r}: {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.cat([noise_like(row, g, sampler) for row, g in zip(x.split(1), generator, strict=True)])


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step ``sigma -> sigma_next`` into a deterministic step to ``sigma_down`` and fresh
    noise of std ``sigma_up`` (``sigma_down**2 + sigma_up**2 = sigma_next**2``). ``eta = 1`` is the
    DDPM posterior variance (Ho et al. 2020), ``eta = 0`` the deterministic DDIM step."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def report(callback: Callback | None, i: int, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> None:
    """Call the progress callback once per step (k-diffusion's dict: x before the update)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
