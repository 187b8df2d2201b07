"""Denoisers: the sampler contract ``D(x, sigma, **cond) -> x0``, the prediction types and their scalings.

A sampler sees only a denoiser. ``Denoiser`` adapts a discrete-time network
``net(x_t, t, context, concat=None) -> eps | v | x0`` to that contract with the preconditioning of
Karras et al. (2022), written as one scaling object per parameterisation (as in sgm's
``denoiser_scaling.py``)::

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * net(c_in(sigma) * x, c_noise(sigma))

``x`` is the VE-frame latent ``x0 + sigma * eps``; ``c_in * x = x / sqrt(1 + sigma**2)`` is the
network's VP input ``x_t``, and ``c_noise`` is the discrete timestep whose noise level is ``sigma``.

The wrappers around a denoiser used at sampling time (guidance, LCM, inpainting) are in
``guidance.py``; the training targets and loss weights in ``objectives.py``. All tensors: ``x`` is
[B, ...] (any trailing shape), ``sigma`` is a float tensor [B] of noise levels >= 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import NoiseSchedule

# The one list of prediction types: the names files and configs store (diffusers' names, as in
# ``scheduler_config.json``), each mapped to the short name of its scaling in ``SCALINGS``.
PREDICTION_TYPES: dict[str, str] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Either form is accepted where a prediction type is read.
_PREDICTION_ALIASES = {name: short for stored, short in PREDICTION_TYPES.items() for name in (short, stored)}

SigmaToT = Callable[[Tensor], Tensor]


def canonical_prediction_type(name: str) -> str:
    """Map ``eps``/``epsilon``, ``v``/``v_prediction``, ``x0``/``sample`` to ``eps``/``v``/``x0``."""
    try:
        return _PREDICTION_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown prediction type {name!r}; valid choices: {', '.join(_PREDICTION_ALIASES)}") from None


def expand_like(c: Tensor, x: Tensor) -> Tensor:
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

    ``net(x_t, t, context, concat=None[, y=y])``: ``x_t`` [B, C, H, W] in the VP frame, ``t`` float32 [B] in
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
        self,
        x: Tensor,
        sigma: Tensor,
        context: Tensor | None = None,
        concat: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """The raw network prediction (eps, v or x0) for VE input ``x`` at noise level ``sigma``."""
        return self._net_output(x, self.scaling(sigma), context, concat, y)

    def output_to_x0(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """Combine a raw prediction with the input: ``c_skip * x + c_out * out``."""
        return self._combine(out, x, self.scaling(sigma))

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        context: Tensor | None = None,
        concat: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        scalings = self.scaling(sigma)
        return self._combine(self._net_output(x, scalings, context, concat, y), x, scalings)

    def _net_output(
        self,
        x: Tensor,
        scalings: tuple[Tensor, ...],
        context: Tensor | None,
        concat: Tensor | None,
        y: Tensor | None = None,
    ) -> Tensor:
        _, _, c_in, c_noise = scalings
        x_in = x * expand_like(c_in, x).to(x.dtype)
        if self.net_dtype is not None:
            x_in = x_in.to(self.net_dtype)
            concat = concat.to(self.net_dtype) if concat is not None else None
            context = context.to(self.net_dtype) if context is not None else None
            y = y.to(self.net_dtype) if y is not None else None
        # `y` (SDXL's added conditioning) only when there is one: SD 1.x/2.x networks need not take it
        extra = {} if y is None else {"y": y}
        return self.net(x_in, c_noise, context, concat=concat, **extra).to(x.dtype)

    @staticmethod
    def _combine(out: Tensor, x: Tensor, scalings: tuple[Tensor, ...]) -> Tensor:
        c_skip, c_out = scalings[0], scalings[1]
        return x * expand_like(c_skip, x).to(x.dtype) + out * expand_like(c_out, x).to(x.dtype)
