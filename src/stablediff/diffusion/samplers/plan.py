"""Sampling plans: the sigmas, timesteps and initial noise scale of (sampler, schedule, steps),
computed exactly as the matching diffusers scheduler computes them.

diffusers' schedulers differ in details that change the numbers, so each sampler carries the
conventions of its counterpart:

* which timesteps: DDIM/DDPM/PNDM space ``steps`` integer timesteps (default spacing "leading",
  plus ``steps_offset``); Euler-family schedulers (Euler, Euler a, Heun, LMS, KDPM2) default to
  "linspace" and keep fractional timesteps, with sigmas interpolated linearly in sigma;
  DPM-Solver/UniPC default to "linspace" over ``steps + 1`` points without the last; LCM uses its
  own distillation grid.
* Karras / exponential sigmas: the Euler family spans the spaced sigmas' range, DPM-Solver/UniPC the
  whole trained range; the network's timestep for such a sigma is the log-sigma interpolation,
  rounded to an integer by KDPM2 (Karras), DPM-Solver and UniPC (Karras), truncated by
  DPM-Solver/UniPC (exponential).
* the last sigma: 0, except DDIM/PLMS with ``set_alpha_to_one=False`` (SD's config) whose last step
  lands on ``sigma(alphas_cumprod[0])``.
* the initial latent. A sampler starts from ``x = noise * init_noise_sigma``. For schedulers that
  work on VP latents (DDIM, DDPM, PNDM, DPM-Solver, UniPC, LCM: ``init_noise_sigma = 1``) the VE
  latent is ``noise / sqrt(ac) = noise * sqrt(1 + sigmas[0]**2)``; the Euler family uses
  ``sigma_max`` for "linspace"/"trailing" spacing and ``sqrt(sigma_max**2 + 1)`` for "leading".
  img2img starts from ``image + noise * sigmas[start]`` for every sampler (``add_noise``).
* the output. A sampler returns the VE latent at ``sigmas[-1]``; the latent diffusers returns (and
  the VAE decodes) is ``x * output_scale`` with ``output_scale = 1 / sqrt(1 + sigmas[-1]**2)``
  (1 unless the last sigma is not 0).
* AUTOMATIC1111's schedule types ("uniform", "sgm_uniform", "simple", "normal", "ddim", "beta",
  "kl_optimal", "align_your_steps", "polyexponential"; ``schedules.a1111_sigmas``) follow A1111 /
  k-diffusion for every sampler: the sigmas of the model's whole table, the network's timestep by
  log-sigma interpolation (not rounded), the start ``noise * sigmas[0]``, the output decoded as it is.
  ``dpmpp_sde`` exists only in k-diffusion: its "default" is k-diffusion's own discretisation, A1111's
  "uniform", and its Karras/exponential sigmas follow k-diffusion too.

``SamplingPlan.sigma_to_t`` gives the denoiser the exact timestep diffusers feeds the network for
each planned sigma, and the log-sigma interpolation for any other (DPM2's midpoints, k-diffusion's
convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..guidance import LCMBoundary
from ..schedules import (
    SIGMA_SCHEDULES,
    NoiseSchedule,
    a1111_sigmas,
    exponential_sigmas,
    karras_sigmas,
    lcm_timesteps,
    spaced_timesteps,
)


@dataclass(frozen=True)
class _Conventions:
    """How one diffusers scheduler builds its schedule (see the module docstring)."""

    default_spacing: str
    grid: str  # "ddim" | "euler" | "solver" | "lcm" | "k" (k-diffusion: default = A1111's "uniform")
    frame: str  # "vp" (latents start as plain noise) | "euler" (init_noise_sigma from sigma_max)
    final_alpha: bool = False  # last step lands on alphas_cumprod[0] unless set_alpha_to_one
    range_from_spaced: bool = False  # Karras/exponential span the spaced sigmas (else the whole table)
    karras_t: str = "log"  # "log" | "round"
    exponential_t: str = "log"  # "log" | "floor"


_DDIM = _Conventions("leading", "ddim", "vp", final_alpha=True)
_DDPM = _Conventions("leading", "ddim", "vp")
_EULER = _Conventions("linspace", "euler", "euler", range_from_spaced=True)
_KDPM2 = _Conventions("linspace", "euler", "euler", range_from_spaced=True, karras_t="round")
_SOLVER = _Conventions("linspace", "solver", "vp", karras_t="round", exponential_t="floor")
_LCM = _Conventions("leading", "lcm", "vp")
_KDIFFUSION = _Conventions("linspace", "k", "euler")

CONVENTIONS: dict[str, _Conventions] = {
    "ddpm": _DDPM,  # DDPMScheduler
    "ddim": _DDIM,  # DDIMScheduler
    "plms": _DDIM,  # PNDMScheduler(skip_prk_steps=True)
    "euler": _EULER,  # EulerDiscreteScheduler
    "euler_a": _EULER,  # EulerAncestralDiscreteScheduler
    "heun": _EULER,  # HeunDiscreteScheduler
    "lms": _EULER,  # LMSDiscreteScheduler
    "dpm2": _KDPM2,  # KDPM2DiscreteScheduler
    "dpmpp_2s_a": _EULER,  # k-diffusion only; Euler-family conventions
    "dpmpp_sde": _KDIFFUSION,  # k-diffusion only (its Brownian noise has no diffusers counterpart)
    "dpmpp_2m": _SOLVER,  # DPMSolverMultistepScheduler
    "dpmpp_2m_sde": _SOLVER,  # DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    "unipc": _SOLVER,  # UniPCMultistepScheduler
    "lcm": _LCM,  # LCMScheduler
}


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class SamplingPlan:
    """What a pipeline needs to run one sampler.

    ``sigmas``: float32 [steps + 1], descending. ``timesteps``: [steps], the network timestep at
    ``sigmas[i]`` (float32 values held in float64; integers except for the Euler family's "linspace"
    spacing and its Karras/exponential sigmas).
    """

    sampler: str
    sigma_schedule: str
    spacing: str
    sigmas: Tensor
    timesteps: Tensor
    init_noise_sigma: float
    schedule: NoiseSchedule = field(repr=False)

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def output_scale(self) -> float:
        """Factor from the sampler's output (VE latent at sigmas[-1]) to diffusers' final latent.
        1 for the other sigma schedules: k-diffusion / A1111 decode the last latent as it is (only
        "kl_optimal" ends above 0 there)."""
        if self.sigma_schedule != "default":
            return 1.0
        return 1.0 / math.sqrt(1.0 + float(self.sigmas[-1]) ** 2)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Network timestep for noise levels ``sigma`` (any shape) -> float64 CPU tensor, same shape:
        the planned timestep for a planned sigma, log-sigma interpolation otherwise."""
        s = torch.as_tensor(sigma).detach().to("cpu", torch.float32)
        flat = s.reshape(-1)
        table = self.sigmas[:-1]
        hits = flat[:, None] == table[None, :]
        found = hits.any(dim=1)
        t = self.schedule.sigma_to_t(flat)
        if bool(found.any()):
            t = torch.where(found, self.timesteps[hits.to(torch.int8).argmax(dim=1)], t)
        return t.reshape(s.shape)

    def wrap_denoiser(self, denoiser: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """Add what the sampler needs around the (guided) denoiser: LCM's boundary condition for
        ``lcm``, nothing otherwise."""
        if self.sampler == "lcm":
            return LCMBoundary(denoiser, self.sigma_to_t)
        return denoiser

    def end_index(self, denoising_end: float) -> int:
        """The steps run before a hand-off at ``denoising_end`` (a fraction of the training
        timesteps), as diffusers' SDXL pipeline: those whose timestep is at or above
        ``round(T - denoising_end * T)``; the sampler then runs on ``sigmas[: end + 1]``."""
        return int((self.timesteps >= self._cutoff(denoising_end)).sum())

    def start_at(self, denoising_start: float) -> int:
        """Index into ``sigmas`` where a refiner takes over at ``denoising_start``, as diffusers'
        SDXL img2img ``get_timesteps``: the steps whose timestep is below the cutoff remain."""
        return self.steps - int((self.timesteps < self._cutoff(denoising_start)).sum())

    def _cutoff(self, fraction: float) -> int:
        T = self.schedule.config.num_train_timesteps
        return int(round(T - fraction * T))

    def handoff_scale(self, sigma: float) -> float:
        """Factor from our VE latent at ``sigma`` to the latent diffusers' scheduler holds there:
        1 / sqrt(1 + sigma^2) for the schedulers that work on VP latents (DDIM, DPM-Solver, UniPC,
        ...), 1 for the Euler family. A base model hands its latents to a refiner in that frame."""
        return 1.0 / math.sqrt(1.0 + sigma**2) if CONVENTIONS[self.sampler].frame == "vp" else 1.0

    def start_index(self, strength: float) -> int:
        """img2img: index into ``sigmas`` to start from, as diffusers' ``get_timesteps``."""
        return img2img_start_index(self.steps, strength)


def img2img_start_index(steps: int, strength: float) -> int:
    """First step of img2img with ``strength`` in [0, 1] (diffusers: ``t_start = steps -
    min(int(steps * strength), steps)``). The sampler then runs on ``sigmas[t_start:]`` from
    ``image + noise * sigmas[t_start]``; strength 1 starts from pure noise at step 0."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init = min(int(steps * strength), steps)
    return max(steps - init, 0)


def _f32(values: Tensor) -> Tensor:
    return values.to(torch.float32).to(torch.float64)


def sampling_plan(
    sampler: str,
    schedule: NoiseSchedule,
    steps: int,
    sigma_schedule: str = "default",
    *,
    spacing: str | None = None,
    rho: float = 7.0,
    lcm_original_steps: int = 50,
) -> SamplingPlan:
    """Sigmas, timesteps and initial noise scale for ``sampler`` with ``steps`` steps.

    ``sigma_schedule``: "default" (the scheduler's own timestep spacing), "karras" (rho),
    "exponential", or one of AUTOMATIC1111's other schedule types (``SIGMA_SCHEDULES``).
    ``spacing`` overrides the schedule config's ``timestep_spacing``, which overrides the scheduler's
    default. ``steps`` may be 1 to T (the trained timesteps; LCM's own grid: 1 to
    ``lcm_original_steps``). Raises ValueError for unknown names or a bad step count.
    """
    if sampler not in CONVENTIONS:
        raise ValueError(f"unknown sampler {sampler!r}; valid choices: {', '.join(CONVENTIONS)}")
    if sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {sigma_schedule!r}; valid choices: {', '.join(SIGMA_SCHEDULES)}")
    conv = CONVENTIONS[sampler]
    cfg = schedule.config
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    spacing = spacing or cfg.timestep_spacing or conv.default_spacing
    name = "uniform" if conv.grid == "k" and sigma_schedule == "default" else sigma_schedule

    if name not in ("default", "karras", "exponential"):
        # A1111's schedule types, as A1111 / k-diffusion run them: log-sigma timesteps, x = noise * sigmas[0]
        sigmas32 = a1111_sigmas(name, steps, schedule.sigmas).to(torch.float32)
        timesteps = _f32(schedule.sigma_to_t(sigmas32[:-1]))
        return SamplingPlan(sampler, sigma_schedule, spacing, sigmas32, timesteps, float(sigmas32[0]), schedule)

    # the scheduler's own discrete schedule (also the range of Karras/exponential for the Euler family)
    if conv.grid == "lcm":
        timesteps = lcm_timesteps(steps, T, lcm_original_steps)
        sigmas = schedule.sigmas[timesteps.long()]
    elif conv.grid in ("euler", "k"):
        # float32 timesteps as np.linspace(..., dtype=np.float32); sigma interpolated linearly in sigma
        timesteps = _f32(spaced_timesteps(steps, spacing, T, cfg.steps_offset, round_linspace=False))
        sigmas = schedule.t_to_sigma(timesteps, "linear")
    else:
        timesteps = spaced_timesteps(steps, spacing, T, cfg.steps_offset, solver_grid=conv.grid == "solver")
        sigmas = schedule.sigmas[timesteps.long()]

    if name == "default":
        last = 0.0
        if conv.final_alpha and not cfg.set_alpha_to_one:
            last = float(schedule.sigmas[0])
        sigmas = torch.cat([sigmas, torch.tensor([last], dtype=torch.float64)])
    else:
        if conv.range_from_spaced:
            lo, hi = float(sigmas[-1]), float(sigmas[0])
        else:
            lo, hi = schedule.sigma_min, schedule.sigma_max
        if name == "karras":
            sigmas = karras_sigmas(steps, lo, hi, rho)
            rounding = conv.karras_t
        else:
            sigmas = exponential_sigmas(steps, lo, hi)
            rounding = conv.exponential_t
        timesteps = schedule.sigma_to_t(sigmas[:-1])
        if rounding == "round":
            timesteps = timesteps.round()
        elif rounding == "floor":
            timesteps = timesteps.floor()

    # diffusers stores timesteps as float32 (or integers); the network sees float32 t anyway
    timesteps = _f32(timesteps)
    sigmas32 = sigmas.to(torch.float32)
    sigma_max = float(sigmas32.max())
    if conv.grid == "k":
        init = float(sigmas32[0])  # k-diffusion: x = noise * sigmas[0]
    elif conv.frame == "euler" and spacing in ("linspace", "trailing"):
        init = sigma_max
    else:
        init = math.sqrt(float(sigmas32[0]) ** 2 + 1)
    return SamplingPlan(sampler, sigma_schedule, spacing, sigmas32, timesteps, init, schedule)
