"""Sampler functions, their registry, and sampling plans (sigmas exactly as diffusers builds them).

Every sampler: ``sampler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
**options) -> x``. Adding a sampler = adding one function here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .base import ancestral_step
from .discrete import ddim, ddpm, lcm, plms
from .k_samplers import dpm2, dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_a, dpmpp_sde, euler, euler_a, heun, lms
from .plan import CONVENTIONS, SamplingPlan, img2img_start_index, sampling_plan
from .unipc import unipc

Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "plms": plms,
    "euler": euler,
    "euler_a": euler_a,
    "heun": heun,
    "lms": lms,
    "dpm2": dpm2,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_2s_a": dpmpp_2s_a,
    "dpmpp_sde": dpmpp_sde,
    "unipc": unipc,
    "lcm": lcm,
}

# Samplers that draw noise on every step (they need a generator). ddim draws only with eta > 0.
STOCHASTIC_SAMPLERS = ("ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_2s_a", "dpmpp_sde", "lcm")

assert set(SAMPLERS) == set(CONVENTIONS)


def get_sampler(name: str) -> Sampler:
    """The sampler function registered under ``name``; ValueError listing the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLERS)}") from None


__all__ = [
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "Sampler",
    "SamplingPlan",
    "ancestral_step",
    "ddim",
    "ddpm",
    "dpm2",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2s_a",
    "dpmpp_sde",
    "euler",
    "euler_a",
    "get_sampler",
    "heun",
    "img2img_start_index",
    "lcm",
    "lms",
    "plms",
    "sampling_plan",
    "unipc",
]
