"""Noise schedules: betas -> alphas_cumprod -> sigmas, timestep spacings and sigma schedules.

Conventions (shared by the whole ``diffusion`` package):

* A discrete-time model is trained on ``num_train_timesteps`` (T, usually 1000) integer timesteps
  ``t = 0 .. T-1`` of the variance-preserving (VP) process
  ``x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * eps`` with ``ac = alphas_cumprod``.
* Samplers work in the variance-exploding (VE) frame of Karras et al. (2022) / k-diffusion:
  ``x = x_t / sqrt(ac[t]) = x0 + sigma * eps`` with ``sigma = sqrt((1 - ac) / ac)``. ``sigma`` grows
  with ``t``; ``NoiseSchedule.sigmas[t]`` is that table.
* The schedule maths is done in float64 (as guided-diffusion does; ``precision="float32"`` repeats
  diffusers' float32 arithmetic instead); sigma lists handed to samplers are float32, as diffusers'
  schedulers hold them.

Everything here is plain torch + math: numpy semantics that diffusers relies on (``np.linspace``,
``np.interp``, ``ndarray.round`` = round half to even) are reproduced on Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
# "default": each sampler's own discretisation (its diffusers scheduler's spacing, see samplers/plan.py);
# the others are AUTOMATIC1111's schedule types (their A1111 names), computed as A1111 / k-diffusion
# compute them (``a1111_sigmas``).
SIGMA_SCHEDULES = (
    "default",
    "karras",
    "exponential",
    "uniform",
    "sgm_uniform",
    "simple",
    "normal",
    "ddim",
    "beta",
    "kl_optimal",
    "align_your_steps",
    "polyexponential",
)

# Diffusers sets alphas_cumprod[-1] to this for zero-terminal-SNR schedules so that sigma_max stays
# finite (sigma = 4096); the VE frame needs a finite sigma too.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(choices)}")


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """``np.linspace(start, stop, num)`` in float64, element for element (last element == stop)."""
    if num <= 0:
        return []
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    values = [start + i * step for i in range(num)]
    values[-1] = float(stop)
    return values


def _arange_down(start: float, stop: float, step: float) -> list[float]:
    """``np.arange(start, stop, -step)`` for ``start > stop`` (values ``start - i * step``)."""
    count = math.ceil((start - stop) / step)
    return [start - i * step for i in range(count)]


# --------------------------------------------------------------------------------------------
# betas and alphas_cumprod


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal (2021), eq. 17 with s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    name: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Beta schedule of a discrete diffusion model, tensor of shape [T], values in (0, 1).

    ``scaled_linear`` (Stable Diffusion): ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``;
    ``linear`` (DDPM): ``linspace(beta_start, beta_end, T)``; ``squaredcos_cap_v2`` (improved DDPM
    cosine schedule, betas capped at 0.999; ``beta_start``/``beta_end`` are ignored).
    ``dtype=torch.float32`` computes exactly as diffusers does (torch.linspace in float32).
    """
    _check_choice("beta schedule", name, BETA_SCHEDULES)
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    n = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=dtype)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=dtype) ** 2
    betas = [min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.tensor(betas, dtype=dtype)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    ``sqrt(alphas_cumprod)`` is shifted and scaled so that it keeps its first value and ends at 0.
    Returns betas of the same shape and dtype; the last beta is 1.
    """
    sqrt_ac = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


# --------------------------------------------------------------------------------------------
# timestep spacings


def spaced_timesteps(
    steps: int,
    spacing: str,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    *,
    round_linspace: bool = True,
    solver_grid: bool = False,
) -> Tensor:
    """Descending float64 timesteps (shape [steps]) chosen from ``0 .. T-1`` as diffusers does.

    The three spacings follow Table 2 of Lin et al. (2023) in diffusers' arithmetic:

    * ``leading``: ``arange(steps) * (T // steps) + steps_offset``; where that would pass T-1 (e.g.
      T steps with SD's offset 1, on which diffusers indexes past its table) the offset is lowered
      so that the largest timestep is T-1.
    * ``trailing``: ``round(arange(T, 0, -T / steps)) - 1`` (always starts at T-1).
    * ``linspace``: ``linspace(0, T - 1, steps)``, rounded to integers unless ``round_linspace`` is
      False (diffusers' Euler-family schedulers keep the fractional values).

    ``solver_grid=True`` is the DPM-Solver/UniPC variant: ``leading`` and ``linspace`` space
    ``steps + 1`` points and drop the smallest, so t = 0 is never a model timestep.
    """
    _check_choice("timestep spacing", spacing, SPACINGS)
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    n = steps + 1 if solver_grid else steps
    if spacing == "linspace":
        values = _linspace(0.0, T - 1.0, n)
        if round_linspace or solver_grid:
            values = [float(round(v)) for v in values]
        values = values[::-1]
    elif spacing == "leading":
        ratio = T // n
        offset = max(min(steps_offset, T - 1 - (n - 1) * ratio), 0)
        values = [float(i * ratio + offset) for i in range(n)][::-1]
    else:
        values = [float(round(v)) - 1.0 for v in _arange_down(float(T), 0.0, T / steps)]
    if solver_grid and spacing != "trailing":
        values = values[:-1]
    return torch.tensor(values, dtype=torch.float64)


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = 50) -> Tensor:
    """Timesteps of latent consistency models (diffusers' LCMScheduler), descending, shape [steps].

    LCM distillation used the ``original_steps`` skipping grid ``k - 1, 2k - 1, .., T - 1`` with
    ``k = T // original_steps``; inference takes ``steps`` evenly strided entries of that grid.
    """
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be in [1, {num_train_timesteps}], got {original_steps}")
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM steps must be in [1, {original_steps}], got {steps}")
    k = num_train_timesteps // original_steps
    grid = [float(i * k - 1) for i in range(original_steps, 0, -1)]
    picks = [math.floor(v) for v in _linspace_open(0.0, float(len(grid)), steps)]
    return torch.tensor([grid[i] for i in picks], dtype=torch.float64)


def _linspace_open(start: float, stop: float, num: int) -> list[float]:
    # np.linspace(start, stop, num, endpoint=False)
    step = (stop - start) / num
    return [start + i * step for i in range(num)]


# --------------------------------------------------------------------------------------------
# sigma schedules (each returns float64 [n + 1], descending, ending with 0)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: ``n`` sigmas evenly spaced in ``sigma ** (1/rho)``, then 0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = [(hi + r * (lo - hi)) ** rho for r in _linspace(0.0, 1.0, n)]
    return torch.tensor([*sigmas, 0.0], dtype=torch.float64)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``n`` sigmas evenly spaced in log(sigma) from sigma_max to sigma_min, then 0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sigmas = [math.exp(v) for v in _linspace(math.log(sigma_max), math.log(sigma_min), n)]
    return torch.tensor([*sigmas, 0.0], dtype=torch.float64)


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """k-diffusion's ``get_sigmas_polyexponential``: log(sigma) runs from log(sigma_max) to
    log(sigma_min) as ``ramp ** rho`` with ``ramp`` from 1 to 0 (rho = 1 is ``exponential_sigmas``), then 0."""
    _check_n(n)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    sigmas = [math.exp(r**rho * (hi - lo) + lo) for r in _linspace(1.0, 0.0, n)]
    return torch.tensor([*sigmas, 0.0], dtype=torch.float64)


# AUTOMATIC1111's schedule types on a model's discrete sigma table ``table`` (ascending, [T], the
# ``NoiseSchedule.sigmas``; A1111 passes k-diffusion's ``DiscreteSchedule`` of the model). Where A1111
# spaces timesteps with ``torch.linspace`` (float32), the timesteps here are that float32 linspace too,
# and sigma at a fractional timestep is k-diffusion's ``t_to_sigma``: log-sigma interpolation.


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def _t_to_sigma(table: Tensor, t: Tensor) -> Tensor:
    """k-diffusion's ``DiscreteSchedule.t_to_sigma``: exp of the log-sigma interpolation at ``t``."""
    log_sigmas = table.to(torch.float64).log()
    t = t.to(torch.float64)
    low, high, w = t.floor().long(), t.ceil().long(), t - t.floor()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _sigma_to_t(table: Tensor, sigma: float) -> float:
    """k-diffusion's ``DiscreteSchedule.sigma_to_t`` (not quantized) for one sigma."""
    log_sigmas = table.to(torch.float64).log()
    log_sigma = math.log(sigma)
    low = min(int((log_sigmas <= log_sigma).sum()) - 1, len(log_sigmas) - 2)
    low = max(low, 0)
    lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
    w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def uniform_sigmas(n: int, table: Tensor) -> Tensor:
    """A1111 "Uniform" (and "Automatic" for Euler, Euler a, LMS, Heun): k-diffusion's
    ``DiscreteSchedule.get_sigmas(n)``, ``n`` timesteps evenly spaced from T-1 to 0, then 0."""
    _check_n(n)
    return _append_zero(_t_to_sigma(table, torch.linspace(len(table) - 1, 0, n)))


def normal_sigmas(n: int, table: Tensor, sgm: bool = False) -> Tensor:
    """A1111 "Normal": ``n`` timesteps evenly spaced from ``sigma_to_t(sigma_max)`` to
    ``sigma_to_t(sigma_min)`` (on the model's own range: the same sigmas as "Uniform"), then 0.
    ``sgm=True`` is "SGM Uniform": ``n + 1`` such timesteps without the last."""
    _check_n(n)
    start, end = _sigma_to_t(table, float(table[-1])), _sigma_to_t(table, float(table[0]))
    t = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return _append_zero(_t_to_sigma(table, t))


def sgm_uniform_sigmas(n: int, table: Tensor) -> Tensor:
    """A1111 "SGM Uniform": ``n + 1`` timesteps evenly spaced from T-1 to 0, the last dropped, then 0."""
    return normal_sigmas(n, table, sgm=True)


def simple_sigmas(n: int, table: Tensor) -> Tensor:
    """A1111 "Simple": every (T / n)-th entry of the table from the top
    (``table[-(1 + int(i * T / n))]``), then 0."""
    _check_n(n)
    stride = len(table) / n
    return _append_zero(torch.stack([table[-(1 + int(i * stride))] for i in range(n)]))


def ddim_uniform_sigmas(n: int, table: Tensor) -> Tensor:
    """A1111 "DDIM": the table at timesteps ``1, 1 + k, 1 + 2k, ..`` below T with ``k = max(T // n, 1)``
    (SD's "leading" timesteps with ``steps_offset=1``), descending, then 0. That is ``ceil((T - 1) / k)``
    sigmas: ``n`` when ``n`` divides T, more otherwise (8 for n = 7), as in A1111."""
    _check_n(n)
    stride = max(len(table) // n, 1)
    return _append_zero(table[1::stride].flip(0))


def beta_sigmas(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """A1111 "Beta" (Lee et al. 2024, "Beta Sampling is All You Need"): ``sigma_min + (sigma_max -
    sigma_min) * q`` where ``q`` are the Beta(alpha, beta) quantiles (scipy's ``betaincinv``, which
    is ``scipy.stats.beta.ppf``) of ``1 - linspace(0, 1, n)``; then 0. A1111's defaults are 0.6, 0.6."""
    _check_n(n)
    from scipy.special import betaincinv  # a run-time dependency (torchsde needs it too); only used here

    quantiles = [float(betaincinv(alpha, beta, 1.0 - p)) for p in _linspace(0.0, 1.0, n)]
    sigmas = [sigma_min + q * (sigma_max - sigma_min) for q in quantiles]
    return torch.tensor([*sigmas, 0.0], dtype=torch.float64)


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """A1111 "KL Optimal" (the KL-optimal schedule of Sabour et al. 2024, "Align Your Steps"):
    ``tan`` of ``n + 1`` angles evenly spaced from ``atan(sigma_max)`` to ``atan(sigma_min)``. As in
    A1111 there is no appended 0: the last step lands on ``sigma_min`` (its latent is decoded as it is)."""
    _check_n(n)
    a_min, a_max = math.atan(sigma_min), math.atan(sigma_max)
    return torch.tensor([math.tan(i / n * a_min + (1.0 - i / n) * a_max) for i in range(n + 1)], dtype=torch.float64)


# The 10-step schedule that Sabour et al. (2024, "Align Your Steps") optimised for SD 1.5, as
# published (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html) and used by A1111 for
# every model that is not SDXL.
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def align_your_steps_sigmas(n: int) -> Tensor:
    """A1111 "Align Your Steps": ``AYS_SD15_SIGMAS`` as they are for n = 11, otherwise log-linearly
    interpolated to ``n`` values (np.interp of log(sigma) on ``linspace(0, 1, .)``); then 0."""
    _check_n(n)
    knots = list(AYS_SD15_SIGMAS)
    if n == len(knots):
        return torch.tensor([*knots, 0.0], dtype=torch.float64)
    xs = _linspace(0.0, 1.0, len(knots))
    ys = [math.log(v) for v in reversed(knots)]  # ascending
    values = []
    for x in _linspace(0.0, 1.0, n):
        j = min(max(sum(1 for k in xs if k <= x) - 1, 0), len(xs) - 2)
        if x >= xs[-1]:
            y = ys[-1]
        else:
            y = (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]) * (x - xs[j]) + ys[j]
        values.append(math.exp(y))
    return torch.tensor([*reversed(values), 0.0], dtype=torch.float64)


def a1111_sigmas(name: str, n: int, table: Tensor, rho: float | None = None) -> Tensor:
    """The sigmas (float64, descending) of AUTOMATIC1111's schedule type ``name`` for ``n`` steps on a
    model with the ascending sigma table ``table``, computed as A1111 1.10 computes them with the
    model's own ``sigma_min = table[0]`` and ``sigma_max = table[-1]``. ``rho`` overrides Karras' 7 and
    Polyexponential's 1. Ends with 0, except "kl_optimal" (ends at sigma_min); "ddim" may return more
    than ``n`` steps (see ``ddim_uniform_sigmas``)."""
    lo, hi = float(table[0]), float(table[-1])
    if name == "karras":
        return karras_sigmas(n, lo, hi, 7.0 if rho is None else rho)
    if name == "exponential":
        return exponential_sigmas(n, lo, hi)
    if name == "polyexponential":
        return polyexponential_sigmas(n, lo, hi, 1.0 if rho is None else rho)
    if name == "beta":
        return beta_sigmas(n, lo, hi)
    if name == "kl_optimal":
        return kl_optimal_sigmas(n, lo, hi)
    if name == "align_your_steps":
        return align_your_steps_sigmas(n)
    on_table = {
        "uniform": uniform_sigmas,
        "sgm_uniform": sgm_uniform_sigmas,
        "normal": normal_sigmas,
        "simple": simple_sigmas,
        "ddim": ddim_uniform_sigmas,
    }
    if name not in on_table:
        raise ValueError(f"unknown A1111 schedule type {name!r}; valid choices: {', '.join(SIGMA_SCHEDULES[1:])}")
    return on_table[name](n, table)


# --------------------------------------------------------------------------------------------
# the schedule object


@dataclass(frozen=True)
class ScheduleConfig:
    """Training noise schedule plus the two inference knobs that SD checkpoints ship with it.

    Defaults are Stable Diffusion 1.x/2.x (``scheduler_config.json``). The prediction type is not
    part of this: it belongs to the denoiser.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_zero_terminal_snr: bool = False
    # Added to "leading" timesteps (SD uses 1, so 50 DDIM steps are 981 .. 1).
    steps_offset: int = 1
    # DDIM/PLMS: whether the step after the last timestep lands on alpha_cumprod = 1 (sigma 0) or on
    # alphas_cumprod[0]. SD ships False, which leaves a little noise (sigma ~ 0.029) in the output.
    set_alpha_to_one: bool = False
    # None: every sampler uses the spacing its diffusers scheduler defaults to.
    timestep_spacing: str | None = None

    def __post_init__(self) -> None:
        _check_choice("beta schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.timestep_spacing is not None:
            _check_choice("timestep spacing", self.timestep_spacing, SPACINGS)
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")


class NoiseSchedule:
    """Discrete VP schedule: ``betas``, ``alphas_cumprod`` and VE ``sigmas``, all float64 [T] on CPU.

    ``sigma_to_t`` / ``t_to_sigma`` convert between the continuous noise level seen by samplers and
    the (possibly fractional) timestep fed to a discrete-time network.

    ``precision="float64"`` (default) computes the schedule in float64. ``"float32"`` reproduces
    diffusers' float32 arithmetic (betas, cumprod, sigma and log-sigma tables) value for value; the
    two differ by < 1e-6 relative, which is enough to flip diffusers' integer truncation of a
    log-interpolated timestep, so exact-parity tests use it.
    """

    def __init__(self, config: ScheduleConfig | None = None, *, precision: str = "float64") -> None:
        if precision not in ("float64", "float32"):
            raise ValueError(f"unknown precision {precision!r}; valid choices: float64, float32")
        self.config = config if config is not None else ScheduleConfig()
        self.precision = precision
        c = self.config
        dtype = torch.float64 if precision == "float64" else torch.float32
        betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, dtype)
        if c.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        if c.rescale_zero_terminal_snr:
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        # Tables are float64 either way; "float32" only rounds them as diffusers' float32 maths does.
        self.betas = betas.double()
        self.alphas_cumprod = alphas_cumprod.double()
        self.sigmas = sigmas.double()
        self.log_sigmas = sigmas.log().double()

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Timestep for a noise level, by linear interpolation in log(sigma) (k-diffusion's
        ``DiscreteSchedule.sigma_to_t``, diffusers' ``_sigma_to_t``); clamped to [0, T-1].

        ``quantize=True`` returns the trained timestep nearest in log(sigma) instead. Input of any
        shape/device; output float64 on CPU with the same shape.
        """
        s = torch.as_tensor(sigma).detach().to("cpu", torch.float64)
        log_s = s.clamp_min(1e-10).log()
        if quantize:
            dists = (log_s.reshape(-1, 1) - self.log_sigmas).abs()
            return dists.argmin(dim=1).to(torch.float64).reshape(s.shape)
        T = self.num_train_timesteps
        low = (torch.searchsorted(self.log_sigmas, log_s.reshape(-1), right=True) - 1).clamp(0, T - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_s.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return (low.to(torch.float64) + w).reshape(s.shape)

    def t_to_sigma(self, t: Tensor, interpolation: Literal["log", "linear"] = "log") -> Tensor:
        """Noise level at (fractional) timesteps ``t`` in [0, T-1]; float64 on CPU, shape of ``t``.

        ``log`` interpolates log(sigma) (k-diffusion, the exact inverse of ``sigma_to_t``);
        ``linear`` interpolates sigma itself (diffusers' ``np.interp`` in the Euler-family
        schedulers' ``set_timesteps``).
        """
        t = torch.as_tensor(t).detach().to("cpu", torch.float64)
        T = self.num_train_timesteps
        if bool(((t < 0) | (t > T - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {T - 1}]")
        if interpolation not in ("log", "linear"):
            raise ValueError(f"unknown interpolation {interpolation!r}; valid choices: log, linear")
        table = self.log_sigmas if interpolation == "log" else self.sigmas
        low = t.floor().long().clamp(0, T - 2)
        w = t - low
        # np.interp's form, slope * (x - x_low) + y_low, with its exact value at the last knot.
        value = (table[low + 1] - table[low]) * w + table[low]
        value = torch.where(w == 1, table[low + 1], value)
        return value.exp() if interpolation == "log" else value
