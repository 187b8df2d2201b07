"""Diffusion maths: noise schedules, denoisers (the sampler contract), the wrappers around them,
training objectives and samplers.

Imports only torch and math; the network is a callable ``net(x, t, context, concat=None)``.
"""

from .denoiser import (
    PREDICTION_TYPES,
    SCALINGS,
    Denoiser,
    EpsScaling,
    VScaling,
    X0Scaling,
    canonical_prediction_type,
)
from .guidance import CFGDenoiser, InpaintDenoiser, LCMBoundary, rescale_guidance
from .objectives import min_snr_gamma_weights, q_sample, snr, training_target
from .samplers import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    SamplingPlan,
    get_sampler,
    img2img_start_index,
    sampling_plan,
)
from .schedules import (
    BETA_SCHEDULES,
    SIGMA_SCHEDULES,
    SPACINGS,
    NoiseSchedule,
    ScheduleConfig,
    a1111_sigmas,
    exponential_sigmas,
    karras_sigmas,
    lcm_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

__all__ = [
    "BETA_SCHEDULES",
    "CFGDenoiser",
    "Denoiser",
    "EpsScaling",
    "InpaintDenoiser",
    "LCMBoundary",
    "NoiseSchedule",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCALINGS",
    "SIGMA_SCHEDULES",
    "SPACINGS",
    "STOCHASTIC_SAMPLERS",
    "SamplingPlan",
    "ScheduleConfig",
    "VScaling",
    "X0Scaling",
    "a1111_sigmas",
    "canonical_prediction_type",
    "exponential_sigmas",
    "get_sampler",
    "img2img_start_index",
    "karras_sigmas",
    "lcm_timesteps",
    "make_betas",
    "min_snr_gamma_weights",
    "q_sample",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "sampling_plan",
    "snr",
    "spaced_timesteps",
    "training_target",
]
