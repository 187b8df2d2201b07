"""AUTOMATIC1111's schedule types (diffusion/schedules.py `a1111_sigmas`), each against a reference
computed here from A1111's / k-diffusion's formulas (A1111 1.10 modules/sd_schedulers.py, k-diffusion
0.1.1 sampling.py and external.DiscreteSchedule) in float64 numpy, and the float32 ones against
k-diffusion's own code; and their wiring through `sampling_plan`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from kdiffusion_reference import load

from stablediff.diffusion import SAMPLERS, NoiseSchedule, ScheduleConfig, sampling_plan
from stablediff.diffusion.schedules import SIGMA_SCHEDULES, a1111_sigmas

A1111_TYPES = SIGMA_SCHEDULES[1:]
STEPS = (1, 2, 7, 10, 11, 20, 33, 50, 1000)
TABLES = {
    "sd": NoiseSchedule().sigmas,  # scaled_linear 0.00085-0.012
    "linear": NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)).sigmas,
}
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]  # A1111's list


# ------------------------------------------------------------------ the references, from the formulas


def _linspace32(start: float, stop: float, n: int) -> np.ndarray:
    # A1111/k-diffusion space timesteps with torch.linspace in the default dtype, float32
    return torch.linspace(start, stop, n).double().numpy()


def _t_to_sigma(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    # DiscreteSchedule.t_to_sigma: exp((1 - w) log_sigma[floor t] + w log_sigma[ceil t]), w = frac(t)
    log = np.log(table)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - np.floor(t)
    return np.exp((1 - w) * log[low] + w * log[high])


def _sigma_to_t(table: np.ndarray, sigma: float) -> float:
    # DiscreteSchedule.sigma_to_t: the last index whose log sigma is <= log(sigma) (clamped to T-2),
    # then the linear weight in log sigma towards the next one, clamped to [0, 1]
    log = np.log(table)
    low = min(int(np.sum(log <= math.log(sigma))) - 1, len(table) - 2)
    low = max(low, 0)
    w = np.clip((log[low] - math.log(sigma)) / (log[low] - log[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _zero(values) -> np.ndarray:
    return np.append(np.asarray(values, dtype=np.float64), 0.0)


def reference(name: str, n: int, table: np.ndarray) -> np.ndarray:
    T, lo, hi = len(table), float(table[0]), float(table[-1])
    if name == "karras":  # get_sigmas_karras, rho = 7
        ramp = np.linspace(0, 1, n)
        return _zero((hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7)
    if name == "exponential":  # get_sigmas_exponential
        return _zero(np.exp(np.linspace(math.log(hi), math.log(lo), n)))
    if name == "polyexponential":  # get_sigmas_polyexponential, A1111's default rho = 1
        ramp = np.linspace(1, 0, n) ** 1.0
        return _zero(np.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))
    if name == "uniform":  # DiscreteSchedule.get_sigmas(n)
        return _zero(_t_to_sigma(table, _linspace32(T - 1, 0, n)))
    if name in ("normal", "sgm_uniform"):  # normal_scheduler(sgm=...), sgm_uniform
        start, end = _sigma_to_t(table, hi), _sigma_to_t(table, lo)
        t = _linspace32(start, end, n + 1)[:-1] if name == "sgm_uniform" else _linspace32(start, end, n)
        return _zero(_t_to_sigma(table, t))
    if name == "simple":  # simple_scheduler
        ss = T / n
        return _zero([table[-(1 + int(x * ss))] for x in range(n)])
    if name == "ddim":  # ddim_scheduler
        ss, x, sigs = max(T // n, 1), 1, []
        while x < T:
            sigs.append(table[x])
            x += ss
        return _zero(sigs[::-1])
    if name == "beta":  # beta_scheduler, alpha = beta = 0.6 (A1111's defaults)
        q = [scipy.stats.beta.ppf(p, 0.6, 0.6) for p in 1 - np.linspace(0, 1, n)]
        return _zero([lo + x * (hi - lo) for x in q])
    if name == "kl_optimal":  # kl_optimal: n + 1 values, no appended zero
        i = np.arange(n + 1)
        return np.tan(i / n * math.atan(lo) + (1.0 - i / n) * math.atan(hi))
    if name == "align_your_steps":  # get_align_your_steps_sigmas, SD 1.5 list
        if n == len(AYS_SD15):
            return _zero(AYS_SD15)
        xs, ys = np.linspace(0, 1, len(AYS_SD15)), np.log(AYS_SD15[::-1])
        return _zero(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1])
    raise AssertionError(name)


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", A1111_TYPES)
@pytest.mark.parametrize("table_name", list(TABLES))
def test_schedule_type_matches_a1111_formula(name: str, table_name: str) -> None:
    table = TABLES[table_name]
    worst = 0.0
    for n in STEPS:
        ours = a1111_sigmas(name, n, table).numpy()
        ref = reference(name, n, table.numpy())
        assert ours.shape == ref.shape, (name, n)
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"{name} on the {table_name} table: max |ours - A1111 formula| = {worst:.3g} over {STEPS} steps")
    assert worst <= 1e-6


def test_against_k_diffusion_code() -> None:
    """k-diffusion's own functions compute in float32 (torch.linspace): equal to float32 rounding."""
    sampling, external = load()
    table = TABLES["sd"]
    lo, hi = float(table[0]), float(table[-1])
    schedule = external.DiscreteSchedule(table, quantize=False)
    cases = {
        "karras": lambda n: sampling.get_sigmas_karras(n, lo, hi),
        "exponential": lambda n: sampling.get_sigmas_exponential(n, lo, hi),
        "polyexponential": lambda n: sampling.get_sigmas_polyexponential(n, lo, hi, 1.0),
        "uniform": lambda n: schedule.get_sigmas(n),
    }
    for name, theirs in cases.items():
        worst = 0.0
        for n in STEPS:
            ours, ref = a1111_sigmas(name, n, table), theirs(n).double()
            worst = max(worst, float(((ours - ref).abs() / ref.clamp_min(1e-12)).max()))
        print(f"{name}: max relative |ours - k-diffusion| = {worst:.3g}")
        assert worst <= 4e-6  # a few float32 ulps (k-diffusion's ramp and power are float32)


def test_shapes_and_ends() -> None:
    table = TABLES["sd"]
    for name in A1111_TYPES:
        for n in (1, 7, 20, 1000):
            sigmas = a1111_sigmas(name, n, table)
            assert sigmas.dtype == torch.float64
            assert (sigmas.float().diff() < 0).all(), (name, n)  # no repeated sigma, even in float32
            if name == "kl_optimal":
                assert sigmas[-1] == pytest.approx(float(table[0]), rel=1e-12)  # A1111 appends no 0 here
            else:
                assert sigmas[-1] == 0
            expected = {"ddim": len(range(1, 1000, max(1000 // n, 1)))}.get(name, n)
            assert len(sigmas) == expected + 1, (name, n)
    assert len(a1111_sigmas("ddim", 7, table)) == 9  # 1, 143, .., 995: A1111's DDIM type gives 8 steps
    with pytest.raises(ValueError, match="n must be >= 1"):
        a1111_sigmas("beta", 0, table)
    with pytest.raises(ValueError, match="unknown A1111 schedule type 'turbo'"):
        a1111_sigmas("turbo", 4, table)


@pytest.mark.parametrize("name", A1111_TYPES[2:])  # karras/exponential keep each scheduler's conventions
def test_plan_follows_a1111(name: str) -> None:
    """In a plan every A1111 type is A1111's sigmas for every sampler: the network's timestep by
    log-sigma interpolation, the start noise * sigmas[0], the last latent decoded as it is."""
    ns = NoiseSchedule()
    sigmas = a1111_sigmas(name, 20, ns.sigmas)
    for sampler in SAMPLERS:
        plan = sampling_plan(sampler, ns, 20, name)
        assert torch.equal(plan.sigmas, sigmas.float()), sampler
        assert plan.steps == len(sigmas) - 1
        assert torch.equal(plan.timesteps, ns.sigma_to_t(sigmas[:-1].float()).float().double())
        assert plan.init_noise_sigma == float(plan.sigmas[0]) and plan.output_scale == 1.0
        assert (plan.timesteps >= 0).all() and (plan.timesteps <= 999).all()
