"""Brownian-tree noise for SDE samplers: k-diffusion's ``BrownianTreeNoiseSampler`` on torchsde.

Instead of a fresh Gaussian per step, the noise of a step ``sigma -> sigma_next`` is the increment
of one fixed Brownian path W over ``[sigma_next, sigma]``, scaled to unit variance. The path depends
on the seed alone, so runs with different step counts sample the same path (the solution converges
as the steps grow) and a midpoint evaluation sees noise consistent with its step's.

``torchsde.BrownianTree`` builds the path lazily, by Brownian-bridge bisection to a tolerance of
1e-6, from ``numpy.random.SeedSequence(entropy)``. As in k-diffusion (and A1111's DPM++ SDE), a
batch with one seed per row uses one tree per row, so image k of a batch equals a batch of one with
its seed. The entropy is each generator's seed (``torch.Generator.initial_seed()``): the same seed
A1111 gives the tree of an image with that seed. The trees are built on the CPU in float32, so a seed
gives the same noise on any device; the noise is then moved to the latent's device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_TOL = 1e-6  # torchsde.BrownianTree's default, which k-diffusion uses
_DIGITS = 6  # torchsde's rounding of times for that tolerance: round(t, -int(log10(tol)))


class BrownianNoise:
    """Unit-variance Brownian increments shaped like ``x`` on ``[sigma_min, sigma_max]``.

    ``generator``: one torch.Generator (one tree for the whole batch, k-diffusion's single seed) or
    one per row of ``x`` (one tree per row). ``noise(sigma, sigma_next)`` takes float32 0-d tensors
    (the sampler's noise levels exactly as k-diffusion computes them) and returns
    ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``.
    """

    def __init__(
        self,
        x: Tensor,
        sigma_min: float,
        sigma_max: float,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        sampler: str,
    ) -> None:
        if generator is None:
            raise ValueError(f"sampler {sampler!r} is stochastic: pass an explicit torch.Generator")
        import torchsde  # deferred: only the Brownian-noise samplers need it

        self.batched = not isinstance(generator, torch.Generator)
        if self.batched:
            if len(generator) != x.shape[0]:
                raise ValueError(f"sampler {sampler!r}: {len(generator)} generators for a batch of {x.shape[0]}")
            seeds = [g.initial_seed() for g in generator]
            w0 = torch.zeros(x.shape[1:], dtype=torch.float32)
        else:
            seeds = [generator.initial_seed()]
            w0 = torch.zeros(x.shape, dtype=torch.float32)
        lo, hi = torch.tensor(sigma_min, dtype=torch.float32), torch.tensor(sigma_max, dtype=torch.float32)
        # torchsde rounds the interval's ends to the digits of its tolerance (1e-6, k-diffusion's too)
        # and clamps queries outside them, with a warning
        self.lo, self.hi = round(float(lo), _DIGITS), round(float(hi), _DIGITS)
        self.trees = [torchsde.BrownianTree(lo, w0, hi, entropy=seed, tol=_TOL) for seed in seeds]
        self.device, self.dtype = x.device, x.dtype

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b, sign = (sigma, sigma_next, 1.0) if sigma < sigma_next else (sigma_next, sigma, -1.0)
        # clamp as torchsde would (k-diffusion's float32 arithmetic can land an ulp above sigma_max)
        a, b = (min(max(float(v), self.lo), self.hi) for v in (a, b))
        w = torch.stack([tree(a, b) for tree in self.trees]) * sign
        if not self.batched:
            w = w[0]
        w = w / (sigma_next - sigma).abs().sqrt()
        return w.to(device=self.device, dtype=self.dtype)
