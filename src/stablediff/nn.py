"""Building blocks shared by the U-Net, the VAE and the text encoder.

`attention()` is the one place that computes attention in the project, so that speed and memory
work (SDPA kernels, chunking, upcasting) happens once for all three models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

# Above this many attention-score elements per call, queries are processed in chunks so that
# the score matrix of a math-kernel fallback never exceeds roughly 1 GiB in float32.
ATTENTION_CHUNK_ELEMENTS = 1 << 28


# What GroupNorm32 calls instead of normalising, set by `group_norm_override` for the current
# thread only: tiled VAE passes (stablediff.tiling) normalise each tile with whole-image statistics.
_NORM_OVERRIDE: ContextVar[Callable[[GroupNorm32, torch.Tensor], torch.Tensor] | None] = ContextVar(
    "group_norm_override", default=None
)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype, as the original LDM code wants:
    half-precision statistics over large feature maps lose too much. PyTorch's CPU and CUDA kernels
    accumulate half-precision inputs in float32 already, so a half-precision input with weights of
    its own dtype goes straight to the kernel (a float32 copy of every map costs ~3% of a bfloat16
    U-Net call on a CPU); mixed dtypes (autocast) are computed on a float32 copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compiled networks (the U-Net, `stablediff.compiled`) never run under tiling's override,
        # and reading a ContextVar would split their graph at every norm.
        override = None if torch.compiler.is_compiling() else _NORM_OVERRIDE.get()
        return self.normalize(x) if override is None else override(self, x)

    def normalize(self, x: torch.Tensor, mean: torch.Tensor | None = None, var: torch.Tensor | None = None):
        """``x`` normalised with its own statistics, or with the given per-(sample, group) ``mean``
        and (biased) ``var``, each [B, num_groups]; in float32, returned in ``x``'s dtype."""
        if mean is None or var is None:
            if x.dtype in (torch.float16, torch.bfloat16) and (self.weight is None or self.weight.dtype != x.dtype):
                weight = self.weight.float() if self.weight is not None else None
                bias = self.bias.float() if self.bias is not None else None
                return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
            return super().forward(x)
        # One multiply-add per element: scale = w / std and shift = b - mean * scale, per channel.
        per_group = self.num_channels // self.num_groups
        scale = torch.rsqrt(var.float() + self.eps).repeat_interleave(per_group, dim=1)  # [B, C]
        shift = -mean.float().repeat_interleave(per_group, dim=1) * scale
        if self.affine:
            scale, shift = scale * self.weight.float(), shift * self.weight.float() + self.bias.float()
        view = (*scale.shape, *(1,) * (x.ndim - 2))
        return torch.addcmul(shift.view(view), x.float(), scale.view(view)).to(x.dtype)


@contextmanager
def group_norm_override(fn: Callable[[GroupNorm32, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, on this thread only, every GroupNorm32 returns ``fn(module, x)``."""
    token = _NORM_OVERRIDE.set(fn)
    try:
        yield
    finally:
        _NORM_OVERRIDE.reset(token)


def upsample_nearest(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Nearest-neighbour 2x (or to ``size``) upsampling: a copy of values, so exact in any dtype.
    Half precision goes through float32 only on backends without a half-precision kernel."""
    scale = None if size else 2.0
    if x.device.type in ("cpu", "cuda") or x.dtype == torch.float32:
        return F.interpolate(x, size=size, scale_factor=scale, mode="nearest")
    return F.interpolate(x.float(), size=size, scale_factor=scale, mode="nearest").to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches start as the identity (DDPM / ADM practice)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    t: [B] float timesteps. Returns [B, dim] float32 as [cos(t*f), sin(t*f)] with frequencies
    f_k = max_period^(-k/half), the layout of the original LDM UNet (diffusers' flip_sin_to_cos).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    causal: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention.

    q: [B, Lq, H*D], k and v: [B, Lk, H*D]. Returns [B, Lq, H*D] in q's dtype.
    `upcast` computes in float32 (SD 2.x 768-v overflows in fp16 otherwise). Long query sequences
    are split in chunks so that memory stays bounded when no fused kernel is available.
    """
    dtype = q.dtype
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    # [B, L, H*D] -> [B, H, L, D]; the fused kernels want unit stride along D (a transposed
    # channels-first map has not): without it SDPA falls back to materialising the scores.
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    per_query = b * heads * lk
    if causal or lq * per_query <= ATTENTION_CHUNK_ELEMENTS:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        step = max(1, ATTENTION_CHUNK_ELEMENTS // per_query)
        out = torch.cat(
            [F.scaled_dot_product_attention(q[:, :, i : i + step], k, v) for i in range(0, lq, step)], dim=2
        )
    return out.transpose(1, 2).reshape(b, lq, inner).to(dtype)


def attention_with_maps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` computed explicitly in float32, also returning the attention maps averaged over
    heads, [B, Lq, Lk] (each row a softmax over the keys): what grounding losses and attention
    visualisations read. Differentiable; no fused kernel, so for short key sequences only."""
    dtype = q.dtype
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (x.float().view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, Lq, Lk]
    out = (probs @ v).transpose(1, 2).reshape(b, lq, inner).to(dtype)
    return out, probs.mean(1)


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter with seeded random values that keep activations of order one:
    weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.02^2). Used for
    random-weight presets (tests, benchmarks), where zero-initialised layers would hide bugs."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(noise / math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.copy_(noise * 0.02)
        else:
            p.copy_(1.0 + noise * 0.1)
    return module
