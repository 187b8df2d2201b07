"""The KL-regularised autoencoder (Rombach et al. 2022, "KL-f8") that the diffusion runs inside.

The VAE owns its latent scale: `encode` returns a posterior over *scaled* latents and `decode`
takes scaled latents, so no caller ever multiplies by 0.18215 itself. Module names follow the
original checkpoints (`encoder.down.{i}.block.{j}`, `mid.attn_1`, `quant_conv`, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.limits import config_from_dict
from stablediff.nn import GroupNorm32, attention, upsample_nearest


@dataclass(frozen=True)
class VAEConfig:
    """Defaults are the Stable Diffusion KL-f8 autoencoder."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for KL-f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "VAEConfig") -> VAEConfig:
        """From JSON data, checked (types, LIMITS); BadFileError naming ``where`` otherwise."""
        return config_from_dict(cls, d, where)


def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return GroupNorm32(cfg.norm_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(cfg, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(cfg, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (as in the checkpoint)."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # [B, C, H, W] -> [B, HW, C]: free for channels-last maps, one copy otherwise
        q, k, v = (proj(n).permute(0, 2, 3, 1).reshape(b, h * w, c) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, heads=1).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest(x))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, then an optional resampler."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Mid(nn.Module):
    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(cfg, ch, ch), AttnBlock(cfg, ch), ResnetBlock(cfg, ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """[B, 3, H, W] image -> [B, 2*z, H/f, W/f] posterior moments (mean, log-variance)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            blocks = [ResnetBlock(cfg, ch if j == 0 else out, out) for j in range(cfg.num_res_blocks)]
            ch = out
            last = i == len(cfg.ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(ch), "downsample"))
        self.mid = Mid(cfg, ch)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down_path(x))

    # The two halves, for tiled encoding (stablediff.tiling): the down path works at image
    # resolution, convolutions only; the head at latent resolution, global self-attention included.
    def down_path(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """[B, z, h, w] latent -> [B, 3, h*f, w*f] image. `up[i]` is stored by resolution level and
    run from the deepest level up, as the checkpoint stores it."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(cfg, ch)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cfg, ch if j == 0 else out, out) for j in range(cfg.num_res_blocks + 1)]
            ch = out
            levels.insert(0, Level(blocks, Upsample(ch) if i else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up_path(self.stem(z))

    # The two halves, for tiled decoding (stablediff.tiling): the stem at latent resolution, global
    # self-attention included; the up path at growing resolution, convolutions only.
    def stem(self, z: torch.Tensor) -> torch.Tensor:
        return self.mid(self.conv_in(z))

    def up_path(self, h: torch.Tensor) -> torch.Tensor:
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over scaled latents. All tensors [B, z, h, w]."""

    def __init__(self, moments: torch.Tensor, scale: float):
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        self.unscaled_mean, self.unscaled_logvar = mean, logvar
        self.mean = mean * scale
        self.std = torch.exp(0.5 * logvar) * scale

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; `noise` (standard normal, like mean) is drawn from `generator` unless given."""
        if noise is None:
            # Noise on the generator's device (CPU by convention), so a seed means the same on any device.
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) of the unscaled latent, summed per sample: [B]."""
        m, lv = self.unscaled_mean, self.unscaled_logvar
        return 0.5 * torch.sum(m.pow(2) + lv.exp() - 1.0 - lv, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """`encode(images in [-1, 1]) -> DiagonalGaussian over scaled latents`,
    `decode(scaled latents) -> images in [-1, 1]` (not clamped)."""

    # Feature maps in channels-last layout (set by the pipeline for inference; see UNetModel).
    channels_last = False

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        f = self.config.downscale
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f}")
        moments = self.quant_conv(self.encoder(self._layout(images))).contiguous()
        return DiagonalGaussian(moments, self.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._layout(latents / self.config.scaling_factor)
        return self.decoder(self.post_quant_conv(z)).contiguous()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator)), posterior
