"""Noise schedules, timestep spacings and sigma schedules against diffusers (and their own maths)."""

from __future__ import annotations

import math

import pytest
import torch

from stablediff.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    ScheduleConfig,
    exponential_sigmas,
    get_sampler,
    karras_sigmas,
    lcm_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    sampling_plan,
    spaced_timesteps,
)
from stablediff.diffusion.denoiser import PREDICTION_TYPES, SCALINGS, canonical_prediction_type

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 calls np.array(tensor, copy=False) internally
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STEPS = (1, 7, 13, 50)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---------------------------------------------------------------------------------------- betas


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(name: str) -> None:
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
    # float32 mode is diffusers' arithmetic; float64 is the default and differs only in rounding
    assert torch.equal(make_betas(name, dtype=torch.float32), ref.betas)
    torch.testing.assert_close(make_betas(name), ref.betas.double(), rtol=1e-6, atol=1e-9)
    ours32 = NoiseSchedule(ScheduleConfig(beta_schedule=name), precision="float32")
    assert torch.equal(ours32.alphas_cumprod, ref.alphas_cumprod.double())
    ours64 = NoiseSchedule(ScheduleConfig(beta_schedule=name))
    assert ours64.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours64.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-6, atol=1e-12)


def test_schedule_is_monotone() -> None:
    ns = NoiseSchedule()
    assert (ns.betas > 0).all() and (ns.betas < 1).all()
    assert (ns.alphas_cumprod.diff() < 0).all()
    assert (ns.sigmas.diff() > 0).all()
    assert ns.sigma_min == pytest.approx(0.0292, abs=1e-4) and ns.sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_zero_terminal_snr_matches_diffusers() -> None:
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_rescale

    betas = make_betas("scaled_linear", dtype=torch.float32)
    assert torch.equal(rescale_zero_terminal_snr(betas), ref_rescale(betas))
    betas64 = rescale_zero_terminal_snr(make_betas("scaled_linear"))
    ac = torch.cumprod(1 - betas64, 0)
    assert ac[-1] == 0 and ac[0] == pytest.approx(1 - 0.00085)
    # the VE frame needs a finite sigma_max: diffusers' Euler convention ac[-1] = 2**-24
    ns = NoiseSchedule(ScheduleConfig(rescale_zero_terminal_snr=True), precision="float32")
    euler = diffusers.EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True)
    assert torch.equal(ns.alphas_cumprod, euler.alphas_cumprod.double())
    assert ns.sigma_max == pytest.approx(4096.0, rel=1e-6)


# ---------------------------------------------------------------------------------------- spacing


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", (*STEPS, 3, 999))
def test_spacings_match_diffusers(spacing: str, steps: int) -> None:
    offset = 1 if spacing == "leading" and steps < 999 else 0
    kw = dict(**SD, timestep_spacing=spacing, steps_offset=offset)
    ddim = diffusers.DDIMScheduler(**kw)
    ddim.set_timesteps(steps)
    ours = spaced_timesteps(steps, spacing, 1000, offset)
    assert ours.tolist() == ddim.timesteps.double().tolist()

    euler = diffusers.EulerDiscreteScheduler(**kw)
    euler.set_timesteps(steps)
    ours = spaced_timesteps(steps, spacing, 1000, offset, round_linspace=False).float()
    assert ours.tolist() == euler.timesteps.tolist()

    solver = diffusers.DPMSolverMultistepScheduler(**kw)
    solver.set_timesteps(steps)
    ours = spaced_timesteps(steps, spacing, 1000, offset, solver_grid=True)
    assert ours.tolist() == solver.timesteps.double().tolist()


@pytest.mark.parametrize("steps", (1, 4, 7, 13, 50))
def test_lcm_timesteps_match_diffusers(steps: int) -> None:
    ref = diffusers.LCMScheduler(**SD)
    ref.set_timesteps(steps)
    assert lcm_timesteps(steps).tolist() == ref.timesteps.double().tolist()


def test_spacing_errors() -> None:
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        spaced_timesteps(10, "uniform")
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        spaced_timesteps(0, "leading")
    with pytest.raises(ValueError, match=r"\[1, 50\]"):
        lcm_timesteps(51)


# ---------------------------------------------------------------------------------------- sigma schedules


@pytest.mark.parametrize("n", (1, 7, 50))
def test_karras_and_exponential(n: int) -> None:
    for sigmas in (karras_sigmas(n, 0.03, 14.6), exponential_sigmas(n, 0.03, 14.6)):
        assert sigmas.shape == (n + 1,) and sigmas[-1] == 0
        assert sigmas[0] == pytest.approx(14.6)
        if n > 1:
            assert sigmas[n - 1] == pytest.approx(0.03)
        assert (sigmas.diff() < 0).all()
    # Karras et al. (2022) eq. 5: evenly spaced in sigma ** (1 / rho)
    inv = karras_sigmas(n, 0.03, 14.6, rho=7.0)[:-1] ** (1 / 7)
    if n > 2:
        torch.testing.assert_close(inv.diff(), inv.diff()[:1].expand(n - 1), rtol=1e-9, atol=1e-12)
        logs = exponential_sigmas(n, 0.03, 14.6)[:-1].log()
        torch.testing.assert_close(logs.diff(), logs.diff()[:1].expand(n - 1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("schedule", ["default", "karras", "exponential"])
def test_plans_are_monotone(sampler: str, schedule: str) -> None:
    ns = NoiseSchedule()
    for steps in STEPS:
        plan = sampling_plan(sampler, ns, steps, schedule)
        assert plan.sigmas.dtype == torch.float32 and plan.sigmas.shape == (steps + 1,)
        assert plan.timesteps.shape == (steps,)
        assert (plan.sigmas.diff() < 0).all() and plan.sigmas[-1] >= 0
        assert (plan.timesteps.diff() <= 0).all()
        assert (plan.timesteps >= 0).all() and (plan.timesteps <= 999).all()
        assert plan.init_noise_sigma >= float(plan.sigmas[0])


def test_ddim_last_sigma_follows_set_alpha_to_one() -> None:
    sd = NoiseSchedule()  # SD ships set_alpha_to_one=False
    plan = sampling_plan("ddim", sd, 50)
    assert float(plan.sigmas[-1]) == pytest.approx(sd.sigma_min, rel=1e-6)
    assert plan.output_scale == pytest.approx(1 / math.sqrt(1 + sd.sigma_min**2))
    plan = sampling_plan("ddim", NoiseSchedule(ScheduleConfig(set_alpha_to_one=True)), 50)
    assert plan.sigmas[-1] == 0 and plan.output_scale == 1.0


# ---------------------------------------------------------------------------------------- sigma <-> t


def test_sigma_t_round_trip() -> None:
    ns = NoiseSchedule()
    t = torch.rand(257, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    t = torch.cat([t, torch.tensor([0.0, 1.0, 500.0, 998.5, 999.0], dtype=torch.float64)])
    torch.testing.assert_close(ns.sigma_to_t(ns.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    integers = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(ns.t_to_sigma(integers), ns.sigmas, rtol=1e-12, atol=0)
    assert torch.equal(ns.t_to_sigma(integers, "linear"), ns.sigmas)
    torch.testing.assert_close(ns.sigma_to_t(ns.sigmas), integers, rtol=0, atol=1e-9)
    # quantize: the nearest trained timestep in log-sigma
    assert torch.equal(ns.sigma_to_t(ns.t_to_sigma(t), quantize=True), t.round())
    # out of range: clamped to the ends of the table
    assert ns.sigma_to_t(torch.tensor([0.0, 1e-4, 1e4])).tolist() == [0.0, 0.0, 999.0]


def test_sigma_to_t_matches_diffusers() -> None:
    ns = NoiseSchedule(precision="float32")
    ref = diffusers.EulerDiscreteScheduler(**SD)
    import numpy as np

    table = (((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5).numpy()  # as diffusers computes it
    log_sigmas = np.log(table)
    sigmas = np.exp(np.linspace(-4.0, 3.0, 301))
    expected = ref._sigma_to_t(sigmas, log_sigmas)
    got = ns.sigma_to_t(torch.from_numpy(sigmas)).numpy()
    # torch's and numpy's float32 log differ by an ulp here and there; divided by the log-sigma
    # spacing of neighbouring timesteps (down to ~0.003) that is up to ~3e-5 of a timestep
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # np.interp in sigma (diffusers' Euler family) at fractional timesteps
    t = np.linspace(0, 999, 77)
    expected = np.interp(t, np.arange(1000), table)
    got = ns.t_to_sigma(torch.from_numpy(t), "linear").numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------- bad names


def test_bad_names_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="scaled_linear, linear, squaredcos_cap_v2"):
        make_betas("cosine")
    with pytest.raises(ValueError, match="scaled_linear"):
        ScheduleConfig(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        ScheduleConfig(timestep_spacing="even")
    with pytest.raises(ValueError, match="float64, float32"):
        NoiseSchedule(precision="float16")
    with pytest.raises(ValueError, match="log, linear"):
        NoiseSchedule().t_to_sigma(torch.tensor([1.0]), "cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        NoiseSchedule().t_to_sigma(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="euler_a.*dpmpp_2m"):
        sampling_plan("k_euler", NoiseSchedule(), 10)
    with pytest.raises(ValueError, match="default, karras, exponential"):
        sampling_plan("euler", NoiseSchedule(), 10, "vp")
    with pytest.raises(ValueError, match="ddim.*unipc"):
        get_sampler("DDIM")
    with pytest.raises(ValueError, match="epsilon.*v_prediction"):
        canonical_prediction_type("flow")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\], got 1001"):
        sampling_plan("ddpm", NoiseSchedule(), 1001)  # 1000 works: tests/test_max_steps.py


def test_one_list_of_prediction_types():
    """PREDICTION_TYPES: the stored (diffusers) names, each mapped to the short name of its scaling."""
    assert tuple(PREDICTION_TYPES) == ("epsilon", "v_prediction", "sample")
    for stored, short in PREDICTION_TYPES.items():
        assert canonical_prediction_type(stored) == canonical_prediction_type(short) == short
        assert SCALINGS[short].prediction_type == short
    assert set(SCALINGS) == set(PREDICTION_TYPES.values())
