"""The latent diffusion U-Net (Rombach et al. 2022; ADM, Dhariwal & Nichol 2021; SDXL, Podell et al. 2023).

Module names follow the original single-file checkpoints (`input_blocks`, `middle_block`,
`output_blocks`, `in_layers`, `transformer_blocks`, `label_emb`, ...) so SD 1.x / 2.x / XL weights
load after stripping the `model.diffusion_model.` prefix. One constructor loop builds every variant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.limits import config_from_dict
from stablediff.nn import (
    GroupNorm32,
    attention,
    attention_with_maps,
    timestep_embedding,
    upsample_nearest,
    zero_module,
)


@dataclass(frozen=True)
class UNetConfig:
    """Defaults are Stable Diffusion 1.5."""

    in_channels: int = 4  # 9 for inpainting: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) with transformers
    num_heads: int | None = 8  # SD 1.x: fixed number of heads ...
    head_dim: int | None = None  # ... SD 2.x: fixed head width (64), heads vary per level
    transformer_depth: int = 1  # transformer blocks per attention block, and in the middle block ...
    # ... unless given per level (SDXL base: (0, 2, 10)): one entry per level, 0 where a level has
    # no attention; None when every attention level has `transformer_depth` (one spelling per model).
    transformer_depth_per_level: tuple[int, ...] | None = None
    context_dim: int = 768
    use_linear_proj: bool = False  # SD 2.x projects in/out of transformers with Linear, not 1x1 conv
    upcast_attention: bool = False
    norm_groups: int = 32
    # SDXL's added conditioning: the width of `y` (pooled text embedding + micro-conditioning,
    # see `micro_conditioning`), embedded by `label_emb` and added to the timestep embedding.
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"UNetConfig needs exactly one of num_heads / head_dim, got {self.num_heads} / {self.head_dim}"
            )
        if not self.channel_mult:
            raise ValueError("channel_mult is empty: a U-Net needs at least one level")
        levels = range(len(self.channel_mult))
        bad = [lvl for lvl in self.attention_levels if lvl not in levels]
        if bad:
            raise ValueError(f"attention_levels {bad} outside the {len(self.channel_mult)} levels")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"channels {self.model_channels * mult} not divisible by norm_groups {self.norm_groups}"
                )
        # Levels with attention, and the middle block (always attention, at the deepest level).
        for level in {*self.attention_levels, len(self.channel_mult) - 1}:
            channels = self.model_channels * self.channel_mult[level]
            heads = self.heads_for(channels)
            if heads < 1 or channels % heads:
                raise ValueError(f"{channels} channels at level {level} cannot be split into {heads} attention heads")
        if self.transformer_depth < 1:
            raise ValueError(f"transformer_depth must be at least 1, got {self.transformer_depth}")
        if self.transformer_depth_per_level is not None:
            self._check_depths(self.transformer_depth_per_level)

    def _check_depths(self, depths: tuple[int, ...]) -> None:
        name = "transformer_depth_per_level"
        if len(depths) != len(self.channel_mult):
            raise ValueError(f"{name} has {len(depths)} entries for {len(self.channel_mult)} levels")
        for level, depth in enumerate(depths):
            if level in self.attention_levels and depth < 1:
                raise ValueError(f"{name}[{level}] is {depth}, but level {level} has attention: it needs at least 1")
            if level not in self.attention_levels and depth != 0:
                raise ValueError(f"{name}[{level}] is {depth}, but level {level} has no attention: it must be 0")
        if all(depths[level] == self.transformer_depth for level in self.attention_levels):
            raise ValueError(
                f"{name} {depths} repeats transformer_depth {self.transformer_depth} at every attention level: "
                "leave it None"
            )

    def depth_at(self, level: int) -> int:
        """Transformer blocks in each attention block of ``level`` (0 = full resolution)."""
        if level not in self.attention_levels:
            return 0
        if self.transformer_depth_per_level is None:
            return self.transformer_depth
        return self.transformer_depth_per_level[level]

    def heads_for(self, channels: int) -> int:
        if self.num_heads is not None:
            return self.num_heads
        return channels // self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "UNetConfig") -> UNetConfig:
        """From JSON data, checked (types, LIMITS); BadFileError naming ``where`` otherwise."""
        return config_from_dict(cls, d, where)


# Width of the sinusoidal embedding of each micro-conditioning number (SDXL's, base and refiner).
MICRO_CONDITIONING_DIM = 256


def sdxl_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    aesthetic_score: float | None = None,
) -> torch.Tensor:
    """SDXL's micro-conditioning numbers, [n] float32, in diffusers' order: original (height, width),
    crop (top, left), then the target (height, width) for the base model or the aesthetic score for
    the refiner: exactly one of ``target_size`` and ``aesthetic_score``."""
    if (target_size is None) == (aesthetic_score is None):
        raise ValueError("give exactly one of target_size (SDXL base) and aesthetic_score (SDXL refiner)")
    tail = (aesthetic_score,) if target_size is None else tuple(target_size)
    return torch.tensor([*original_size, *crop_top_left, *tail], dtype=torch.float32)


def micro_conditioning(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """The U-Net's `y` for SDXL: the pooled text embedding [B, P] followed by the sinusoidal
    embedding (``timestep_embedding``, cos then sin, 256 wide) of each of the ``time_ids``
    ([n] for every row, or [B, n]), as diffusers' `text_time` embedding builds it. [B, P + 256 n] float32."""
    if time_ids.ndim == 1:
        time_ids = time_ids.expand(pooled.shape[0], -1)
    if pooled.ndim != 2 or time_ids.ndim != 2 or time_ids.shape[0] != pooled.shape[0]:
        raise ValueError(
            f"pooled [B, P] and time_ids [n] or [B, n] expected, got {tuple(pooled.shape)}, {tuple(time_ids.shape)}"
        )
    fourier = timestep_embedding(time_ids.reshape(-1).to(pooled.device), MICRO_CONDITIONING_DIM)
    fourier = fourier.reshape(time_ids.shape[0], -1)  # row b: id 0's embedding, then id 1's, ...
    return torch.cat([pooled.float(), fourier], dim=-1)


def widen(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` repeated along the batch to ``rows`` rows: [t; t; ...], the layout of a context
    batch [uncond; cond] that shares one input (see `UNetModel`)."""
    n = t.shape[0]
    if n >= rows:
        return t
    if rows % n:
        raise ValueError(f"cannot share {n} input rows among {rows} conditioning rows: not a multiple")
    return torch.cat([t] * (rows // n))


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added in between (ADM residual block)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        # Sequential indices are the checkpoint's: in_layers.{0 norm, 2 conv}, emb_layers.1,
        # out_layers.{0 norm, 3 conv} (index 2 is the dropout of the original).
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Identity(),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + widen(self.emb_layers(emb).to(h.dtype), h.shape[0])[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over itself (context=None) or over a context sequence.

    While `maps` is a list (see `stablediff.train.grounding.cross_attention_maps`), each call
    appends its attention maps [B, Lq, Lk] (mean over heads) to it."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.maps: list[torch.Tensor] | None = None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())  # to_out.0; .1 was dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.maps is None:
            return self.to_out(attention(q, k, v, self.heads, upcast=self.upcast))
        out, maps = attention_with_maps(q, k, v, self.heads)
        self.maps.append(maps)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives value and gate."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))  # net.0, net.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, then a GEGLU MLP."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = widen(x, context.shape[0])  # the first use of the context: shared rows part here
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on the context by cross-attention."""

    def __init__(self, channels: int, cfg: UNetConfig, depth: int):
        super().__init__()
        heads = cfg.heads_for(channels)
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        self.linear = cfg.use_linear_proj
        proj = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, heads, cfg.upcast_attention) for _ in range(depth)
        )
        self.proj_out = zero_module(proj())

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, C, H, W] -> [B, HW, C]
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)  # back to [B, C, H, W]
        if not self.linear:
            x = self.proj_out(x)
        return x + widen(residual, x.shape[0])


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Nearest 2x, or to the skip's size when the input side was odd.
        return self.conv(upsample_nearest(x, size))


class TimestepEmbedSequential(nn.Sequential):
    """A U-Net block: each layer takes what it needs of (x, emb, context)."""

    def forward(self, x, emb, context, size=None):  # noqa: D401 - forward of a container
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """`unet(x, t, context, concat=None, y=None) -> eps or v`.

    x: [B, 4, h, w] latents; t: [B] (or scalar) float timesteps in [0, 999];
    context: [B, L, context_dim]; concat: optional [B, C, h, w] channels appended to x
    (inpainting models take mask + masked-image latent); y: [B, adm_in_channels], required by
    (and only by) models with `adm_in_channels` (SDXL: `micro_conditioning(pooled, time_ids)`).
    Returns [B, out_channels, h, w].

    Shared input: ``context`` (and ``y``) may have k times the rows of ``x`` (classifier-free
    guidance: [uncond; cond] contexts for one latent). ``x``, ``t`` and ``concat`` are then shared
    by the k conditionings, and every layer before the first cross-attention runs once on them
    instead of k times (exactly the rows a batch [x; x] would compute). The result has k*B rows.
    """

    shares_input_rows = True  # see above; Denoiser-wrapping code checks this before relying on it
    # Run the feature maps in channels-last layout (the pipeline sets it for inference): oneDNN's
    # and cuDNN's convolutions then skip reordering them, and the transformers' [B, HW, C]
    # sequences are views. The weights keep their layout, so no second copy of them exists.
    channels_last = False

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.gradient_checkpointing = False
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            # Nested as the checkpoint's `label_emb.0.{0,2}` (the original's num_classes="sequential").
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult, groups)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups),
            SpatialTransformer(ch, cfg, cfg.transformer_depth),
            ResBlock(ch, emb_dim, ch, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        )

    def _add_conditioning(self, emb: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The timestep embedding plus SDXL's embedded `y`; a missing or unexpected `y` is an error
        (silently ignoring it would sample from the wrong conditioning)."""
        width = self.config.adm_in_channels
        if width is None:
            if y is not None:
                raise ValueError("y was given, but this U-Net has no added conditioning (adm_in_channels is None)")
            return emb
        if y is None:
            raise ValueError(
                f"this U-Net (adm_in_channels={width}, SDXL-style) needs y [B, {width}]: the pooled text "
                "embedding and the micro-conditioning, see micro_conditioning()"
            )
        if y.ndim != 2 or y.shape[1] != width:
            raise ValueError(f"y must be [B, {width}] (adm_in_channels), got {tuple(y.shape)}")
        return emb + self.label_emb(y.to(emb.dtype))

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        concat: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects {self.config.in_channels} input channels, got {x.shape[1]}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if y is not None and y.shape[0] != x.shape[0]:  # rows differ from the first layer on: no sharing
            x, t = widen(x, y.shape[0]), widen(t, y.shape[0])
        emb_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(emb_dtype))
        emb = self._add_conditioning(emb, y)
        context = context.to(x.dtype)

        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            # The next skip's size tells an Upsample where to land (odd latent sides).
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, torch.cat([h, widen(skip, h.shape[0])], dim=1), emb, context, size)
        out = widen(self.out(h), context.shape[0])  # a model without cross-attention never widened
        return out.contiguous()
