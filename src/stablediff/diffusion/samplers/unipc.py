"""UniPC: unified predictor-corrector of Zhao et al. (2023), data-prediction form, B(h) = e^h - 1.

Written in the VE frame with ``lambda = -log(sigma)``: diffusers' VP update
``x_t = (sigma_t / sigma_s) x_s - alpha_t (phi terms)`` divided by ``alpha_t`` is
``x_t = (s_t / s_s) x_s - (phi terms)`` on the VE latents. Follows diffusers'
UniPCMultistepScheduler (``solver_type="bh2"``, ``predict_x0=True``, ``lower_order_final=True``):
each step first corrects the current sample with the new model output (UniC), then predicts the next
one (UniP) from the stored outputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Callback, DenoiserFn, distinct_steps, report, sigma_batch, sigma_list


def _coefficients(rks: list[float], h: float, order: int) -> tuple[list[list[float]], list[float], float, float]:
    """The linear system of UniPC (Zhao et al. eq. 8 with B(h) = expm1(-h)) for ``order`` terms.

    Returns (R, b, h_phi_1, B_h) where R[k][m] = rks[m] ** k and b[k] = h_phi_{k+1} * (k+1)! / B_h.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = math.expm1(hh)
    factorial = 1
    R: list[list[float]] = []
    b: list[float] = []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return R, b, h_phi_1, b_h


def _solve(R: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


@torch.no_grad()
def unipc(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    order: int = 2,
) -> Tensor:
    """UniPC-bh2 multistep predictor-corrector of Zhao et al. (2023) (diffusers UniPCMultistep, order 2).
    Zero-length steps (repeated sigmas) are skipped (``distinct_steps``)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    args = extra_args or {}
    sig, index = distinct_steps(sigma_list(sigmas))
    n = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    outputs: list[Tensor] = []  # x0 predictions at sig[0..i], newest last
    last_x: Tensor | None = None
    last_order = 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, sig[i]), **args)
        report(callback, index[i], x, sig[i], sig[i + 1], denoised)
        if last_x is not None:
            x = _correct(x, last_x, denoised, outputs, sig, lam, i, last_order)
        outputs = [*outputs[-(order - 1) :], denoised] if order > 1 else [denoised]
        # lower order for the warm-up and at the end (lower_order_final)
        this_order = min(order, n - i, len(outputs))
        last_x, last_order = x, this_order
        x = _predict(x, outputs, sig, lam, i, this_order)
    return x


def _predict(x: Tensor, outputs: list[Tensor], sig: list[float], lam: list[float], i: int, order: int) -> Tensor:
    """UniP: from x at sig[i] to sig[i + 1] using the last ``order`` outputs."""
    m0 = outputs[-1]
    if sig[i + 1] == 0:
        return m0  # lambda = inf: the first-order update reduces to the data prediction
    h = lam[i + 1] - lam[i]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[i - k] - lam[i]) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    R, b, h_phi_1, b_h = _coefficients(rks, h, order)
    x_t = (sig[i + 1] / sig[i]) * x - h_phi_1 * m0
    if d1s:
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
        x_t = x_t - b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True))
    return x_t


def _correct(
    x: Tensor,
    last_x: Tensor,
    model_t: Tensor,
    outputs: list[Tensor],
    sig: list[float],
    lam: list[float],
    i: int,
    order: int,
) -> Tensor:
    """UniC: redo the step sig[i-1] -> sig[i] with the new output ``model_t`` at sig[i]."""
    m0 = outputs[-1]  # the output at sig[i - 1]
    h = lam[i] - lam[i - 1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[i - 1 - k] - lam[i - 1]) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    R, b, h_phi_1, b_h = _coefficients(rks, h, order)
    rhos = [0.5] if order == 1 else _solve(R, b)
    x_t = (sig[i] / sig[i - 1]) * last_x - h_phi_1 * m0
    corr = sum((r * d for r, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_t - b_h * (corr + rhos[-1] * (model_t - m0))
