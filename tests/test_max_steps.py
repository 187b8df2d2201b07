"""The most steps GenerationParams accepts (limits.LIMITS, 1000: SD's trained timesteps) work for
every sampler: DPM-Solver/UniPC's integer timesteps repeat one above 500 steps (diffusers returns NaN
there; ours skip the zero-length step), and DDIM/PLMS/DDPM's "leading" timesteps with SD's offset 1
would pass 999 at 1000 steps (diffusers indexes past its table; ours lower the offset)."""

from __future__ import annotations

import pytest
import torch

from stablediff.diffusion import SAMPLERS, NoiseSchedule, get_sampler, sampling_plan
from stablediff.diffusion.samplers.base import distinct_steps
from stablediff.diffusion.schedules import SIGMA_SCHEDULES
from stablediff.limits import LIMITS
from stablediff.params import GenerationParams

MAX_STEPS = int(LIMITS["GenerationParams"]["steps"].hi)
LCM_MAX = 50  # LCM's own grid: the 50 steps it was distilled on (diffusers' limit too)
MU, S = 0.5, 0.5


def gaussian(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    s2 = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
    return (x * S**2 + MU * s2) / (S**2 + s2)


def run(sampler: str, steps: int, schedule: str = "default") -> tuple[torch.Tensor, list[int]]:
    plan = sampling_plan(sampler, NoiseSchedule(), steps, schedule)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * plan.init_noise_sigma + MU
    seen: list[int] = []
    out = get_sampler(sampler)(
        plan.wrap_denoiser(gaussian),
        x,
        plan.sigmas,
        callback=lambda info: seen.append(info["i"]),
        generator=torch.Generator().manual_seed(1),
    )
    return out * plan.output_scale, seen


def test_the_maximum_is_validated() -> None:
    assert MAX_STEPS == 1000
    GenerationParams("a", steps=MAX_STEPS).validate()
    with pytest.raises(ValueError, match="steps must be at most 1000, got 1001"):
        GenerationParams("a", steps=MAX_STEPS + 1).validate()
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\], got 1001"):
        sampling_plan("euler", NoiseSchedule(), MAX_STEPS + 1)
    with pytest.raises(ValueError, match=r"LCM steps must be in \[1, 50\], got 51"):
        sampling_plan("lcm", NoiseSchedule(), LCM_MAX + 1)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_at_the_maximum(sampler: str) -> None:
    """Finite, and the Gaussian data come out right (mean and spread), at the most steps."""
    steps = LCM_MAX if sampler == "lcm" else MAX_STEPS
    out, seen = run(sampler, steps)
    assert torch.isfinite(out).all()
    assert abs(float(out.mean()) - MU) < 0.3 and 0.2 < float(out.std()) < 0.9, (float(out.mean()), float(out.std()))
    assert seen[-1] == steps - 1 and seen == sorted(set(seen))  # the callback reports the plan's step numbers


def test_repeated_timesteps_are_skipped_not_divided_by() -> None:
    plan = sampling_plan("dpmpp_2m", NoiseSchedule(), 1000)
    sig = [float(v) for v in plan.sigmas]
    values, index = distinct_steps(sig)
    assert len(values) == len(sig) - 1  # diffusers' timesteps 500, 500 (round half to even)
    assert index[-1] == len(sig) - 2 and len(index) == len(values) - 1 and index == sorted(set(index))
    # the solve over the distinct sigmas is the same as over the list with the repeat
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * plan.init_noise_sigma
    with_repeat = get_sampler("dpmpp_2m")(gaussian, x, plan.sigmas)
    without = get_sampler("dpmpp_2m")(gaussian, x, torch.tensor(values, dtype=torch.float32))
    assert torch.equal(with_repeat, without)
    assert distinct_steps([3.0, 2.0, 2.0, 2.0, 1.0, 0.0]) == ([3.0, 2.0, 1.0, 0.0], [2, 3, 4])
    assert distinct_steps([3.0, 3.0, 2.0, 1.0, 1.0]) == ([3.0, 2.0, 1.0], [1, 3])
    assert distinct_steps([3.0]) == ([3.0], [])


def test_leading_spacing_at_the_maximum() -> None:
    plan = sampling_plan("ddim", NoiseSchedule(), 1000)
    assert plan.timesteps.tolist() == list(range(999, -1, -1))  # offset 1 lowered to 0, not 1..1000
    assert sampling_plan("ddim", NoiseSchedule(), 999).timesteps[0] == 999  # 998 * 1 + 1: offset kept


@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES[1:])
def test_every_schedule_type_at_the_maximum(schedule: str) -> None:
    plan = sampling_plan("dpmpp_2m", NoiseSchedule(), MAX_STEPS, schedule)
    assert (plan.sigmas[:-1].diff() < 0).all()  # no repeated sigma in float32
    out, _ = run("dpmpp_2m", MAX_STEPS, schedule)
    assert torch.isfinite(out).all()
