"""dpmpp_sde: k-diffusion's DPM++ SDE with its Brownian-tree noise, against k-diffusion's own
`sample_dpmpp_sde` (kdiffusion_reference) on an analytic denoiser, and on Gaussian data."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from kdiffusion_reference import load

from stablediff.diffusion import STOCHASTIC_SAMPLERS, NoiseSchedule, get_sampler, karras_sigmas, sampling_plan
from stablediff.diffusion.samplers import dpmpp_sde
from stablediff.diffusion.samplers.brownian import BrownianNoise

MU, S = 0.3, 0.8  # the data N(MU, S^2) of the analytic denoiser
SEEDS = [11, 12, 13]


def denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """Exact E[x0 | x] for Gaussian data plus a nonlinear term, so that errors do not cancel."""
    s2 = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
    return (x * S**2 + MU * s2) / (S**2 + s2) + 0.05 * torch.tanh(x) * s2.sqrt() / (1 + s2)


def start(sigma_max: float, batch: int = 3) -> torch.Tensor:
    noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return MU + math.sqrt(S**2 + sigma_max**2) * noise


def reference(x: torch.Tensor, sigmas: torch.Tensor, seed, **kw) -> torch.Tensor:
    """k-diffusion's sample_dpmpp_sde with its BrownianTreeNoiseSampler (A1111 passes one seed per image)."""
    sampling, _ = load()
    noise = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)
    with warnings.catch_warnings():  # torchsde warns when k-diffusion queries a float32 ulp past sigma_max
        warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
        return sampling.sample_dpmpp_sde(denoiser, x, sigmas, noise_sampler=noise, disable=True, **kw)


CASES = [
    ("karras", 1, {}),
    ("karras", 2, {}),
    ("karras", 7, {}),
    ("karras", 20, {}),
    ("karras", 50, {}),
    ("uniform", 13, {}),  # dpmpp_sde's own default
    ("karras", 10, {"eta": 0.5, "s_noise": 0.8}),
    ("karras", 10, {"eta": 0.0}),
    ("karras", 10, {"r": 0.3}),
]


@pytest.mark.parametrize(("schedule", "steps", "options"), CASES)
def test_matches_k_diffusion(schedule: str, steps: int, options: dict) -> None:
    """One tree per batch row (a list of generators / of seeds) and one tree for the whole batch
    (one generator / one seed): equal to k-diffusion within 1e-5."""
    plan = sampling_plan("dpmpp_sde", NoiseSchedule(), steps, "default" if schedule == "uniform" else schedule)
    sigmas = plan.sigmas
    x = start(float(sigmas[0]))
    ours = dpmpp_sde(denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in SEEDS], **options)
    theirs = reference(x, sigmas, SEEDS, **options)
    one = dpmpp_sde(denoiser, x, sigmas, generator=torch.Generator().manual_seed(7), **options)
    theirs_one = reference(x, sigmas, 7, **options)
    diffs = float((ours - theirs).abs().max()), float((one - theirs_one).abs().max())
    print(f"dpmpp_sde vs k-diffusion sample_dpmpp_sde, {schedule} {steps} steps {options}: max |diff| {diffs}")
    assert max(diffs) <= 1e-5
    assert float((ours - x).abs().max()) > 0.1  # it did sample


def test_image_k_of_a_batch_is_a_batch_of_one_with_its_seed() -> None:
    sigmas = karras_sigmas(12, 0.0292, 14.6146).float()
    x = start(float(sigmas[0]))
    batch = dpmpp_sde(denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    for k, seed in enumerate(SEEDS):
        alone = dpmpp_sde(denoiser, x[k : k + 1], sigmas, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(batch[k : k + 1], alone)
    again = dpmpp_sde(denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    assert torch.equal(batch, again)
    other = dpmpp_sde(denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s + 1) for s in SEEDS])
    assert float((other - batch).abs().max()) > 1e-2


def test_brownian_noise_is_unit_variance_and_additive() -> None:
    """Increments over adjacent intervals add up (one path), and each is N(0, 1) after scaling."""
    x = torch.zeros(1, 20000)
    noise = BrownianNoise(x, 0.03, 14.6, torch.Generator().manual_seed(3), "test")
    a, b, c = (torch.tensor(v, dtype=torch.float32) for v in (10.0, 4.0, 1.0))
    whole = noise(a, c) * (a - c).sqrt()
    parts = noise(a, b) * (a - b).sqrt() + noise(b, c) * (b - c).sqrt()
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)
    z = noise(a, b)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        BrownianNoise(x, 0.03, 14.6, [torch.Generator(), torch.Generator()], "test")


def test_gaussian_data_mean_and_variance() -> None:
    """As tests/test_samplers.py checks every sampler: N(mu, s^2 + sigma_max^2) -> N(mu, s^2) at 200
    Karras steps (measured: mean 0.5010, variance -0.9%)."""
    mu, s = 0.5, 0.5
    sigmas = karras_sigmas(200, 0.0292, 14.6146).float()
    z = torch.randn(1, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = mu + math.sqrt(s**2 + float(sigmas[0]) ** 2) * (z - z.mean()) / z.std()

    def gaussian(x, sigma, **_):
        s2 = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return (x * s**2 + mu * s2) / (s**2 + s2)

    out = dpmpp_sde(gaussian, x, sigmas, generator=torch.Generator().manual_seed(2))
    mean, var = float(out.mean()), float(out.var()) / s**2
    print(f"dpmpp_sde on Gaussian data: mean {mean:.4f} (want {mu}), var/s^2 {var:.4f}")
    assert abs(float(out.mean()) - mu) < 0.03
    assert abs(float(out.var()) / s**2 - 1) < 0.03


def test_registered_and_needs_a_generator() -> None:
    assert get_sampler("dpmpp_sde") is dpmpp_sde and "dpmpp_sde" in STOCHASTIC_SAMPLERS
    sigmas = karras_sigmas(3, 0.1, 10).float()
    with pytest.raises(ValueError, match="torch.Generator"):
        dpmpp_sde(denoiser, torch.zeros(1, 4), sigmas)
    with pytest.raises(ValueError, match="r must be > 0"):
        dpmpp_sde(denoiser, torch.zeros(1, 4), sigmas, generator=torch.Generator(), r=0.0)
    # the plan follows k-diffusion: its default is A1111's "uniform", it starts from noise * sigmas[0]
    ns = NoiseSchedule()
    plan, uniform = sampling_plan("dpmpp_sde", ns, 9), sampling_plan("euler", ns, 9, "uniform")
    assert torch.equal(plan.sigmas, uniform.sigmas) and torch.equal(plan.timesteps, uniform.timesteps)
    assert plan.init_noise_sigma == float(plan.sigmas[0]) and plan.output_scale == 1.0
