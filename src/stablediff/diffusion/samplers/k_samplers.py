"""Samplers of the probability-flow ODE / reverse SDE in the VE frame (k-diffusion's family).

Each function follows the step arithmetic of its diffusers scheduler so that, fed the same sigmas
(see ``plan.py``), it reproduces diffusers' latents; where k-diffusion and diffusers differ the
docstring says which one is followed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import (
    Callback,
    DenoiserFn,
    ancestral_step,
    distinct_steps,
    f32,
    noise_like,
    report,
    sigma_batch,
    sigma_list,
)
from .brownian import BrownianNoise


def _churn(
    x: Tensor,
    sigma: float,
    n: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generator: torch.Generator | None,
    name: str,
) -> tuple[Tensor, float]:
    """Karras et al. (2022) Algorithm 2, lines 4-6: raise the noise level to ``sigma_hat``."""
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = f32(sigma * (gamma + 1))
    x = x + noise_like(x, generator, name) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


@torch.no_grad()
def euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps of Karras et al. (2022), Algorithm 2 (k-diffusion ``sample_euler``)."""
    args = extra_args or {}
    sig = sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator, "euler")
        denoised = denoiser(x, sigma_batch(x, sigma_hat), **args)
        d = (x - denoised) / sigma_hat
        report(callback, i, x, sig[i], sig[i + 1], denoised)
        x = x + d * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def euler_a(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``, diffusers EulerAncestral)."""
    args = extra_args or {}
    sig = sigma_list(sigmas)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigma_batch(x, sig[i]), **args)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        report(callback, i, x, sig[i], sig[i + 1], denoised)
        x = x + (x - denoised) / sig[i] * (sigma_down - sig[i])
        if sigma_up > 0:
            x = x + noise_like(x, generator, "euler_a") * (s_noise * sigma_up)
    return x


@torch.no_grad()
def heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun steps of Karras et al. (2022), Algorithm 2; Euler for the last step to sigma = 0."""
    args = extra_args or {}
    sig = sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator, "heun")
        denoised = denoiser(x, sigma_batch(x, sigma_hat), **args)
        d = (x - denoised) / sigma_hat
        report(callback, i, x, sig[i], sig[i + 1], denoised)
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - denoiser(x_2, sigma_batch(x, sig[i + 1]), **args)) / sig[i + 1]
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def dpm2(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver-2-like midpoint steps, midpoint at the log-sigma mean (k-diffusion ``sample_dpm_2``,
    diffusers KDPM2); Euler for the last step to sigma = 0."""
    args = extra_args or {}
    sig = sigma_list(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma), **args)
        d = (x - denoised) / sigma
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        # torch.lerp(log s_next, log s, 0.5) as diffusers computes it (end - (end - start) * 0.5)
        log_s, log_next = math.log(sigma), math.log(sigma_next)
        sigma_mid = f32(math.exp(log_s - (log_s - log_next) * 0.5))
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = (x_2 - denoiser(x_2, sigma_batch(x, sigma_mid), **args)) / sigma_mid
        x = x + d_2 * (sigma_next - sigma)
    return x


def _gauss_legendre(fn: Callable[[float], float], a: float, b: float) -> float:
    # 3-point Gauss-Legendre: exact for polynomials of degree <= 5 (LMS needs degree <= 3).
    nodes = (-math.sqrt(3 / 5), 0.0, math.sqrt(3 / 5))
    weights = (5 / 9, 8 / 9, 5 / 9)
    half, mid = (b - a) / 2, (a + b) / 2
    return half * sum(w * fn(mid + half * u) for u, w in zip(nodes, weights, strict=True))


def lms_coefficient(order: int, sig: list[float], i: int, j: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial of node ``sig[i-j]`` on the
    nodes ``sig[i], .., sig[i-order+1]`` (exact, where k-diffusion/diffusers call scipy's quad)."""

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
        return prod

    return _gauss_legendre(basis, sig[i], sig[i + 1])


@torch.no_grad()
def lms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep in sigma (k-diffusion ``sample_lms``, diffusers LMSDiscrete), order 4.
    Zero-length steps (repeated sigmas) are skipped (``distinct_steps``)."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    args = extra_args or {}
    sig, index = distinct_steps(sigma_list(sigmas))
    ds: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigma_batch(x, sig[i]), **args)
        ds.append((x - denoised) / sig[i])
        if len(ds) > order:
            ds.pop(0)
        report(callback, index[i], x, sig[i], sig[i + 1], denoised)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, sig, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


@torch.no_grad()
def dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver++(2M) of Lu et al. (2022), midpoint form (diffusers DPMSolverMultistep, order 2).

    First order for the first step and for the last step to sigma = 0 (diffusers' lower_order_final).
    Zero-length steps (repeated sigmas, where diffusers returns NaN) are skipped (``distinct_steps``).
    """
    args = extra_args or {}
    sig, index = distinct_steps(sigma_list(sigmas))
    old: Tensor | None = None
    h_last = 0.0
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma), **args)
        report(callback, index[i], x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)  # lambda = -log(sigma)
        c = math.exp(-h) - 1.0
        x = (sigma_next / sigma) * x - c * denoised
        if old is not None:
            # D1 = (m0 - m1) / r with r = h_last / h; the update adds -c/2 * D1
            x = x - (0.5 * c * h / h_last) * (denoised - old)
        old, h_last = denoised, h
    return x


@torch.no_grad()
def dpmpp_2m_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form (diffusers ``algorithm_type="sde-dpmsolver++"``; k-diffusion
    ``sample_dpmpp_2m_sde`` with eta). Fresh Gaussian noise per step from ``generator``. Zero-length
    steps (repeated sigmas) are skipped (``distinct_steps``)."""
    args = extra_args or {}
    sig, index = distinct_steps(sigma_list(sigmas))
    old: Tensor | None = None
    h_last = 0.0
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma), **args)
        report(callback, index[i], x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        eta_h = eta * h
        keep = -math.expm1(-h - eta_h)  # 1 - exp(-2h) for eta = 1
        x = (sigma_next / sigma * math.exp(-eta_h)) * x + keep * denoised
        if old is not None:
            x = x + (0.5 * keep * h / h_last) * (denoised - old)
        if eta > 0:
            x = x + noise_like(x, generator, "dpmpp_2m_sde") * (
                sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            )
        old, h_last = denoised, h
    return x


@torch.no_grad()
def dpmpp_2s_a(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver++(2S), midpoint r = 1/2 in lambda (k-diffusion ``sample_dpmpp_2s_ancestral``)."""
    args = extra_args or {}
    sig = sigma_list(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma), **args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_down == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = f32(math.exp(-(-math.log(sigma) + h / 2)))
            x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoiser(x_2, sigma_batch(x, sigma_mid), **args)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_up > 0:
            x = x + noise_like(x, generator, "dpmpp_2s_a") * (s_noise * sigma_up)
    return x


def _lambda(sigma: float) -> Tensor:
    # k-diffusion's t_fn on a float32 sigma: its noise-level arithmetic is float32, and the Brownian
    # tree must be queried at exactly its points
    return torch.tensor(sigma, dtype=torch.float32).log().neg()


@torch.no_grad()
def dpmpp_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic), k-diffusion ``sample_dpmpp_sde`` (A1111 "DPM++ SDE"): two stages
    per step in lambda = -log(sigma), each an ancestral DPM-Solver++ step with Brownian-tree noise.

    Stage 1 goes from sigma to the point ``s = lambda + r h`` (r = 1/2) with the first x0 estimate;
    stage 2 redoes the whole step with ``(1 - 1/(2r)) D(x) + 1/(2r) D(x_s)``. The noise of each stage
    is the increment of one Brownian path over its noise levels (``BrownianNoise``: one torchsde tree
    per generator, seeded with the generator's seed). Euler for the last step to sigma = 0;
    zero-length steps are skipped (``distinct_steps``). Two network calls per step.
    """
    if r <= 0:
        raise ValueError(f"r must be > 0, got {r}")
    args = extra_args or {}
    sig, index = distinct_steps(sigma_list(sigmas))
    positive = [s for s in sig if s > 0]
    if len(sig) < 2 or not positive:
        return x
    noise = BrownianNoise(x, min(positive), max(sig), generator, "dpmpp_sde")
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma), **args)
        report(callback, index[i], x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
            continue
        t, t_next = _lambda(sigma), _lambda(sigma_next)
        s = t + (t_next - t) * r
        at_t, at_s, at_next = t.neg().exp(), s.neg().exp(), t_next.neg().exp()  # float32, as k-diffusion
        sig_t = float(at_t)
        # stage 1: ancestral step to sigma_s, x0 estimate `denoised`
        sigma_down, sigma_up = ancestral_step(sig_t, float(at_s), eta)
        ratio = sigma_down / sig_t
        x_2 = ratio * x - (ratio - 1) * denoised
        if sigma_up > 0:
            x_2 = x_2 + noise(at_t, at_s) * (s_noise * sigma_up)
        denoised_2 = denoiser(x_2, sigma_batch(x, float(at_s)), **args)
        # stage 2: ancestral step to sigma_next with the combined estimate
        sigma_down, sigma_up = ancestral_step(sig_t, float(at_next), eta)
        ratio = sigma_down / sig_t
        x = ratio * x - (ratio - 1) * ((1 - fac) * denoised + fac * denoised_2)
        if sigma_up > 0:
            x = x + noise(at_t, at_next) * (s_noise * sigma_up)
    return x
