"""Building blocks shared by the U-Net, the VAE and the text encoder.

`attention()` is the one place that computes attention in the project, so that speed and memory
work (SDPA kernels, chunking, upcasting) happens once for all three models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Above this many attention-score elements per call, queries are processed in chunks so that
# the score matrix of a math-kernel fallback never exceeds roughly 1 GiB in float32.
ATTENTION_CHUNK_ELEMENTS = 1 << 28


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as the original LDM code does:
    half-precision statistics over large feature maps lose too much."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return super().forward(x)


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
    # [B, L, H*D] -> [B, H, L, D]
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
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
