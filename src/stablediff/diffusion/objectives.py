"""The training side of the diffusion maths: the forward process ``q_sample``, the regression
target of each prediction type, the signal-to-noise ratio and Min-SNR-gamma loss weights.

``t`` is always a tensor [B] of integer timesteps in [0, T-1] and ``alphas_cumprod`` the schedule's
float tensor [T] (``NoiseSchedule.alphas_cumprod``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .denoiser import canonical_prediction_type


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


def min_snr_gamma_weights(
    t: Tensor, alphas_cumprod: Tensor, gamma: float, prediction_type: str, floor: float = 0.0
) -> Tensor:
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
