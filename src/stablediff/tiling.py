"""Tiled VAE decoding and encoding: large images in bounded memory, exactly (docs/memory.md).

The memory of a VAE pass lies at image resolution: the decoder's up path holds 128-256 channels
at full size (about 12 GB in float32 for a 2048x2048 image), the encoder's down path likewise.
Only those paths are tiled. The decoder's stem (conv_in and the mid block, whose self-attention
sees everything) and the encoder's head run on the whole latent, which is small.

A path is cut into stages, one per resolution level (a decoder stage is the upsampler that
feeds a level, then the level's res blocks; an encoder stage a level's res blocks, then its
downsampler). Each stage reads a whole-image map and writes one, tile by tile: every tile is a
core plus a halo as wide as the stage's receptive field, so every convolution at the core sees
what it sees untiled, and the cores are pasted. What a tile cannot see is GroupNorm's statistics,
which are the whole image's. They are gathered one GroupNorm at a time: a pass over the tiles
runs each tile up to the first GroupNorm whose statistics are not known yet, accumulates that
GroupNorm's per-group moments over the tile cores, and stops the tile there; after the pass those
statistics are exact (every earlier GroupNorm having used exact ones). A stage with n GroupNorms
takes n such shortened passes and a last, whole one that writes the output: about 2.5-3x the
time of an untiled pass for SD's VAE, and the same result up to float rounding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stablediff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from stablediff.nn import GroupNorm32, group_norm_override

TILING_MODES = ("auto", "always", "never")
DEFAULT_TILE = 512  # image pixels per side of a tile's core


# --- Deciding -------------------------------------------------------------------------------


def use_tiling(mode: str, estimate: int, budget: int | None) -> bool:
    """Whether to tile a VAE pass whose untiled peak is estimated at ``estimate`` bytes: always,
    never, or ("auto") when it exceeds ``budget`` (None: no budget known, never)."""
    if mode not in TILING_MODES:
        raise ValueError(f"VAE tiling must be one of {TILING_MODES}, got {mode!r}")
    if mode == "auto":
        return budget is not None and estimate > budget
    return mode == "always"


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that an allocation on ``device`` may still take: the CUDA device's free memory (plus
    what torch's caching allocator holds unused), or the host's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# --- Estimating -----------------------------------------------------------------------------
# Peak activations, in elements, from a walk of the eager no-grad forward, calibrated against
# measured peak RSS (benchmarks/vae_tiling.py, docs/benchmarks.md): a CPU convolution needs a
# workspace as large as its larger side besides its output; a ResnetBlock peaks at its input and
# four maps of its width; an upsampler holds its input and three maps at 4x the pixels; a level's
# input stays alive while the level runs (the caller still holds it); the mid block holds about
# fourteen latent-size maps (the fused attention kernels never hold the score matrix).


def _block(c_in: int, c_out: int, res: int) -> int:
    """A ResnetBlock's peak, its input included: norm + silu, conv1 (with workspace), norm2 +
    silu, conv2 (with workspace)."""
    return res * (c_in + max(2 * c_in, c_in + c_out + max(c_in, c_out), 4 * c_out))


def _up_path_elements(cfg: VAEConfig, h: int, w: int) -> int:
    ch, res, peak = cfg.ch * cfg.ch_mult[-1], h * w, 0
    for i in reversed(range(len(cfg.ch_mult))):
        out, level_input = cfg.ch * cfg.ch_mult[i], ch * res
        for j in range(cfg.num_res_blocks + 1):
            peak = max(peak, (level_input if j else 0) + _block(ch if j == 0 else out, out, res))
            ch = out
        if i:
            peak = max(peak, level_input + 13 * ch * res)  # input, nearest 2x copy, conv + workspace
            res *= 4
    return max(peak, res * (4 * ch + cfg.out_channels))  # norm_out, silu, conv_out + workspace


def _down_path_elements(cfg: VAEConfig, h: int, w: int) -> int:
    ch, res = cfg.ch, h * w * cfg.downscale**2
    peak = res * (cfg.in_channels + 2 * ch)  # conv_in + workspace
    for i, mult in enumerate(cfg.ch_mult):
        out, level_input = cfg.ch * mult, ch * res
        for j in range(cfg.num_res_blocks):
            peak = max(peak, (level_input if j else 0) + _block(ch if j == 0 else out, out, res))
            ch = out
        if i < len(cfg.ch_mult) - 1:
            peak = max(peak, level_input + 3 * ch * res)  # input, padded copy, strided conv + workspace
            res //= 4
    return peak


def _mid_elements(cfg: VAEConfig, h: int, w: int) -> int:
    return 14 * cfg.ch * cfg.ch_mult[-1] * h * w


@dataclass(frozen=True)
class _Plan:
    """One stage in numbers. ``units``: pixels of its input and of its output map per pixel of
    the grid its tiles are cut on (the coarser of the two): (1, 2) for a stage that upsamples,
    (2, 1) for one that downsamples, (1, 1). ``reach``: grid pixels that a core pixel's result
    depends on, on each side. ``blocks``: its res blocks' (in, out) channels; ``first``: it
    starts with the encoder's conv_in; ``head``: it ends with the decoder's norm_out and conv_out."""

    units: tuple[int, int]
    c_in: int
    c_out: int
    reach: int
    blocks: tuple[tuple[int, int], ...]
    first: bool = False
    head: bool = False

    def working(self, cfg: VAEConfig, grid_pixels: int) -> int:
        """Peak elements of one tile of ``grid_pixels`` (its halo included), as the layer walk
        above counts them, plus the tile's input copied contiguous by the first convolution."""
        fine = grid_pixels * max(self.units) ** 2  # pixels at the higher resolution of the two
        peak = max(_block(a, b, fine) for a, b in self.blocks)
        if self.units == (1, 2):
            peak = max(peak, 13 * self.c_in * grid_pixels)  # upsampler: input, nearest 2x copy, conv + workspace
        if self.units == (2, 1):
            peak = max(peak, 3 * self.blocks[-1][1] * fine)  # downsampler: input, padded copy, conv
        if self.first:
            peak = max(peak, fine * (self.c_in + 2 * cfg.ch))
        if self.head:
            peak = max(peak, fine * (4 * self.blocks[-1][1] + self.c_out))
        return peak + self.c_in * grid_pixels * self.units[0] ** 2


def _decoder_plans(cfg: VAEConfig) -> list[_Plan]:
    """The up path's stages, deepest first; 3x3 convolutions reach one pixel at their resolution."""
    plans, c = [], cfg.ch * cfg.ch_mult[-1]
    for k, i in enumerate(reversed(range(len(cfg.ch_mult)))):
        out, up, head = cfg.ch * cfg.ch_mult[i], k > 0, i == 0
        convs = 2 * (cfg.num_res_blocks + 1) + up + head
        blocks = tuple((c if j == 0 else out, out) for j in range(cfg.num_res_blocks + 1))
        units, reach = ((1, 2), math.ceil(convs / 2)) if up else ((1, 1), convs)
        plans.append(_Plan(units, c, cfg.out_channels if head else out, reach, blocks, head=head))
        c = out
    return plans


def _encoder_plans(cfg: VAEConfig) -> list[_Plan]:
    """The down path's stages; the stride-2 downsampler reaches two pixels (its padding is one-sided)."""
    plans, c = [], cfg.ch
    for i, mult in enumerate(cfg.ch_mult):
        out, down, first = cfg.ch * mult, i < len(cfg.ch_mult) - 1, i == 0
        convs = first + 2 * cfg.num_res_blocks + 2 * down
        blocks = tuple((c if j == 0 else out, out) for j in range(cfg.num_res_blocks))
        units, reach = ((2, 1), math.ceil(convs / 2)) if down else ((1, 1), convs)
        plans.append(_Plan(units, cfg.in_channels if first else c, out, reach, blocks, first=first))
        c = out
    return plans


def _tiled_elements(cfg: VAEConfig, plans: list[_Plan], height: int, width: int, tile: int) -> int:
    """Peak elements of running ``plans`` tiled over an image of height x width: each stage
    holds its whole input and output maps and one tile's working set."""
    peak = 0
    map_h, map_w = (height, width) if plans[0].first else (height // cfg.downscale, width // cfg.downscale)
    for plan in plans:
        u_in, u_out = plan.units
        grid_h, grid_w = map_h // u_in, map_w // u_in
        core = max(1, tile * grid_h // height)  # the tile's side in grid pixels
        region = min(grid_h, core + 2 * plan.reach) * min(grid_w, core + 2 * plan.reach)
        whole = plan.c_in * map_h * map_w + plan.c_out * grid_h * grid_w * u_out**2
        peak = max(peak, whole + plan.working(cfg, region))
        map_h, map_w = grid_h * u_out, grid_w * u_out
    return peak


def _one_tile(cfg: VAEConfig, height: int, width: int, tile: int | None) -> bool:
    h, w = height // cfg.downscale, width // cfg.downscale
    return tile is None or len(tile_grid(h, w, max(1, tile // cfg.downscale), 0)) == 1


def decode_bytes(cfg: VAEConfig, height: int, width: int, itemsize: int = 4, tile: int | None = None) -> int:
    """Estimated peak activation bytes (weights excluded) of decoding one height x width image,
    untiled or with cores of ``tile`` pixels."""
    h, w = height // cfg.downscale, width // cfg.downscale
    image = 4 * cfg.out_channels * height * width  # the float32 copy the pipeline makes
    if _one_tile(cfg, height, width, tile):
        return itemsize * max(_mid_elements(cfg, h, w), _up_path_elements(cfg, h, w)) + image
    tiled = _tiled_elements(cfg, _decoder_plans(cfg), height, width, tile)
    return itemsize * max(_mid_elements(cfg, h, w), tiled) + image


def encode_bytes(cfg: VAEConfig, height: int, width: int, itemsize: int = 4, tile: int | None = None) -> int:
    """Estimated peak activation bytes (weights excluded) of encoding one height x width image,
    untiled or with cores of ``tile`` pixels."""
    h, w = height // cfg.downscale, width // cfg.downscale
    image = itemsize * cfg.in_channels * height * width
    if _one_tile(cfg, height, width, tile):
        return itemsize * max(_mid_elements(cfg, h, w), _down_path_elements(cfg, h, w)) + image
    features = cfg.ch * cfg.ch_mult[-1] * h * w  # the down path's output, kept for the head
    tiled = _tiled_elements(cfg, _encoder_plans(cfg), height, width, tile)
    return itemsize * max(_mid_elements(cfg, h, w) + features, tiled) + image


# --- Tiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One tile in grid pixels: its core (the tiles' cores partition the grid) and the region it
    computes, the core widened by the halo and clipped to the grid."""

    core: tuple[int, int, int, int]  # top, bottom, left, right
    region: tuple[int, int, int, int]


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) cut into ceil(n / size) nearly equal spans: no sliver of a last tile."""
    count = max(1, -(-n // size))
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def tile_grid(h: int, w: int, tile: int, halo: int) -> list[Tile]:
    """Tiles of at most ``tile`` pixels per core side over an h x w grid."""
    if tile < 1:
        raise ValueError(f"the tile size must be at least one pixel, got {tile}")
    return [
        Tile((r0, r1, c0, c1), (max(0, r0 - halo), min(h, r1 + halo), max(0, c0 - halo), min(w, c1 + halo)))
        for r0, r1 in _spans(h, tile)
        for c0, c1 in _spans(w, tile)
    ]


class _Gathered(Exception):
    """Stops a tile once it has given the statistics its pass gathers."""


class _Statistics:
    """The whole image's GroupNorm statistics, learnt one GroupNorm per pass (installed with
    `group_norm_override`). A GroupNorm with known statistics normalises with them; the first
    without accumulates its per-(sample, group) moments over the tile's core (merged in float64
    with Chan et al.'s pairwise update) and stops the tile."""

    def __init__(self):
        self.known: dict[GroupNorm32, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gathering: tuple[GroupNorm32, int, torch.Tensor, torch.Tensor] | None = None
        self.core = (0, 0, 0, 0)  # the tile's core within its region, in grid pixels
        self.region_rows = 1

    def __call__(self, norm: GroupNorm32, x: torch.Tensor) -> torch.Tensor:
        if norm in self.known:
            return norm.normalize(x, *self.known[norm])
        s = x.shape[-2] // self.region_rows  # this map's pixels per grid pixel
        r0, r1, c0, c1 = (v * s for v in self.core)
        core = x[..., r0:r1, c0:c1].unflatten(1, (norm.num_groups, -1)).float()  # a view in float32
        var, mean = torch.var_mean(core, dim=(2, 3, 4), correction=0)
        n_b, mean_b = core[0, 0].numel(), mean.double()
        m2_b = var.double() * n_b
        if self.gathering is None:
            self.gathering = (norm, n_b, mean_b, m2_b)
        else:
            _, n_a, mean_a, m2_a = self.gathering
            delta, n = mean_b - mean_a, n_a + n_b
            self.gathering = (norm, n, mean_a + delta * n_b / n, m2_a + m2_b + delta**2 * n_a * n_b / n)
        raise _Gathered

    def settle(self) -> bool:
        """After a pass: make what it gathered known; False when it gathered nothing (it ran whole)."""
        if self.gathering is None:
            return False
        norm, n, mean, m2 = self.gathering
        self.known[norm], self.gathering = (mean, m2 / n), None
        return True


def _run_stage(stage: Callable[[torch.Tensor], torch.Tensor], plan: _Plan, x: torch.Tensor, tile: int):
    """``stage`` over the whole map ``x``, tile by tile (``tile`` grid pixels per core side),
    equal to ``stage(x)`` up to float rounding: passes gather the GroupNorm statistics one by one,
    the last writes the output."""
    u_in, u_out = plan.units
    h, w = x.shape[-2] // u_in, x.shape[-1] // u_in
    tiles = tile_grid(h, w, tile, plan.reach)
    if len(tiles) == 1:
        return stage(x)
    stats, out = _Statistics(), None
    while True:
        with group_norm_override(stats):
            for tile_ in tiles:
                (t0, t1, l0, l1), (r0, r1, c0, c1) = tile_.region, tile_.core
                stats.core, stats.region_rows = (r0 - t0, r1 - t0, c0 - l0, c1 - l0), t1 - t0
                try:
                    y = stage(x[..., t0 * u_in : t1 * u_in, l0 * u_in : l1 * u_in])
                except _Gathered:
                    continue
                if out is None:
                    out = y.new_empty(*y.shape[:2], h * u_out, w * u_out)
                rows, cols = slice((r0 - t0) * u_out, (r1 - t0) * u_out), slice((c0 - l0) * u_out, (c1 - l0) * u_out)
                out[..., r0 * u_out : r1 * u_out, c0 * u_out : c1 * u_out] = y[..., rows, cols]
                del y  # before the next tile runs
        if not stats.settle():
            return out


def _chain(*steps: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return run


def _decoder_stages(vae: AutoencoderKL) -> list[tuple[Callable, _Plan]]:
    """The up path as `up_path` runs it, regrouped: the upsampler that ends a level starts the next stage."""
    decoder, levels = vae.decoder, list(reversed(vae.decoder.up))
    stages = []
    for k, (level, plan) in enumerate(zip(levels, _decoder_plans(vae.config), strict=True)):
        before = [getattr(levels[k - 1], levels[k - 1].resample_name)] if k else []
        after = [decoder.norm_out, F.silu, decoder.conv_out] if plan.head else []
        stages.append((_chain(*before, *level.block, *after), plan))
    return stages


def _encoder_stages(vae: AutoencoderKL) -> list[tuple[Callable, _Plan]]:
    """The down path as `down_path` runs it: conv_in, then one stage per level."""
    encoder = vae.encoder
    plans = _encoder_plans(vae.config)
    return [
        (_chain(*([encoder.conv_in] if i == 0 else []), level), plan)
        for i, (level, plan) in enumerate(zip(encoder.down, plans, strict=True))
    ]


def _run_path(stages: Sequence[tuple[Callable, _Plan]], x: torch.Tensor, image_rows: int, tile: int) -> torch.Tensor:
    for stage, plan in stages:
        grid_rows = x.shape[-2] // plan.units[0]
        x = _run_stage(stage, plan, x, max(1, tile * grid_rows // image_rows))
    return x


# --- Decoding and encoding ------------------------------------------------------------------


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """`vae.decode(latents)` tile by tile, equal up to float rounding: scaled latents [B, z, h, w]
    -> images [B, 3, fh, fw]. ``tile``: image pixels per side of a tile's core. A latent that
    fits in one tile is decoded whole."""
    f = vae.config.downscale
    if _one_tile(vae.config, latents.shape[-2] * f, latents.shape[-1] * f, tile):
        return vae.decode(latents)
    stem = vae.decoder.stem(vae.post_quant_conv(latents / vae.config.scaling_factor))
    return _run_path(_decoder_stages(vae), stem, latents.shape[-2] * f, tile)


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, images: torch.Tensor, tile: int = DEFAULT_TILE) -> DiagonalGaussian:
    """`vae.encode(images)` tile by tile, equal up to float rounding: the down path tiled, the mid
    block and the rest on the whole latent. ``tile`` as for `decode_tiled`."""
    f = vae.config.downscale
    if images.shape[-1] % f or images.shape[-2] % f:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f}")
    if _one_tile(vae.config, images.shape[-2], images.shape[-1], tile):
        return vae.encode(images)
    features = _run_path(_encoder_stages(vae), images, images.shape[-2], tile)
    return DiagonalGaussian(vae.quant_conv(vae.encoder.head(features)), vae.config.scaling_factor)
