"""Tiled VAE decoding and encoding: large images in bounded memory (docs/memory.md).

The memory of a VAE pass lies at image resolution: the decoder's up path holds 128-256 channels
at full size (about 12 GB in float32 for a 2048x2048 image), the encoder's down path likewise.
Only those parts are tiled. The decoder's stem (conv_in and the mid block, with its global
self-attention) runs on the whole latent, which is small, and so does the encoder's head.

Each tile is a core of the latent grid plus a halo of latent pixels on every side, as wide as
the tiled part's receptive field (`decoder_reach`, `encoder_reach`), so that every convolution
at the core sees what it sees untiled. GroupNorm is the one operation that looks at the whole
image; with ``stats="global"`` (the default) the tiles run twice: a first pass accumulates each
GroupNorm's per-group statistics over the tile cores (normalising with the tile's own statistics
meanwhile), and the second normalises every tile with those whole-image statistics and pastes the
cores. ``stats="tile"`` runs once with each tile's own statistics and blends the overlaps
linearly: half the work, but the tiles' tones drift apart where the image is not uniform
(docs/benchmarks.md has both errors).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from stablediff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from stablediff.nn import GroupNorm32, group_norm_override

TILING_MODES = ("auto", "always", "never")
DEFAULT_TILE = 512  # pixels per side of a tile's core
# One pass with each tile's own GroupNorm statistics, then passes with whole-image statistics
# gathered in the pass before: within 2/255 of the untiled decode (docs/benchmarks.md).
DEFAULT_PASSES = 4


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
# twelve latent-size maps (the fused attention kernels never hold the score matrix).


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
    return 12 * cfg.ch * cfg.ch_mult[-1] * h * w


def _region(cfg: VAEConfig, h: int, w: int, tile: int | None, reach: int) -> tuple[int, int] | None:
    """The largest tile region (latent pixels) of an h x w latent, or None when one tile is all."""
    if tile is None or len(tile_grid(h, w, tile // cfg.downscale, 0)) == 1:
        return None
    side = tile // cfg.downscale + 2 * reach
    return min(h, side), min(w, side)


def decode_bytes(cfg: VAEConfig, height: int, width: int, itemsize: int = 4, tile: int | None = None) -> int:
    """Estimated peak activation bytes (weights excluded) of decoding one height x width image,
    untiled or with cores of ``tile`` pixels."""
    h, w = height // cfg.downscale, width // cfg.downscale
    image = 4 * cfg.out_channels * height * width  # the float32 result
    region = _region(cfg, h, w, tile, decoder_reach(cfg))
    if region is None:
        return itemsize * max(_mid_elements(cfg, h, w), _up_path_elements(cfg, h, w)) + image
    stem = cfg.ch * cfg.ch_mult[-1]  # channels of the stem's output, kept whole while the tiles run
    tiles = _up_path_elements(cfg, *region) + stem * region[0] * region[1]  # + the tile's slice
    return itemsize * max(_mid_elements(cfg, h, w), stem * h * w + tiles) + 2 * image


def encode_bytes(cfg: VAEConfig, height: int, width: int, itemsize: int = 4, tile: int | None = None) -> int:
    """Estimated peak activation bytes (weights excluded) of encoding one height x width image,
    untiled or with cores of ``tile`` pixels."""
    h, w = height // cfg.downscale, width // cfg.downscale
    image = itemsize * cfg.in_channels * height * width
    region = _region(cfg, h, w, tile, encoder_reach(cfg))
    if region is None:
        return itemsize * max(_mid_elements(cfg, h, w), _down_path_elements(cfg, h, w)) + image
    features = 4 * cfg.ch * cfg.ch_mult[-1] * h * w  # the down path's float32 output, assembled
    tiles = itemsize * _down_path_elements(cfg, *region)
    return max(itemsize * _mid_elements(cfg, h, w), tiles) + features + 2 * image


# --- Tiles ----------------------------------------------------------------------------------


def decoder_reach(cfg: VAEConfig) -> int:
    """Latent pixels that a pixel of the decoder's up path sees on each side (its receptive
    field): two 3x3 convolutions per res block, one per upsampler and conv_out, each reaching one
    pixel at its own resolution. 13 for SD's VAE."""
    reach, scale = 0.0, 1
    for i in reversed(range(len(cfg.ch_mult))):
        reach += 2 * (cfg.num_res_blocks + 1) / scale
        if i:
            scale *= 2
            reach += 1 / scale
    return math.ceil(reach + 1 / scale)


def encoder_reach(cfg: VAEConfig) -> int:
    """Latent pixels that a latent pixel of the encoder's down path sees on each side: conv_in,
    two convolutions per res block, and the stride-2 downsamplers, which reach two pixels. 10 for
    SD's VAE."""
    scale = cfg.downscale
    reach = 1 / scale
    for i in range(len(cfg.ch_mult)):
        reach += 2 * cfg.num_res_blocks / scale
        if i < len(cfg.ch_mult) - 1:
            reach += 2 / scale
            scale //= 2
    return math.ceil(reach)


@dataclass(frozen=True)
class Tile:
    """One tile in latent pixels: its core (the tiles' cores partition the latent) and the region
    it computes, the core widened by the halo and clipped to the latent."""

    core: tuple[int, int, int, int]  # top, bottom, left, right
    region: tuple[int, int, int, int]


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) cut into ceil(n / size) nearly equal spans: no sliver of a last tile."""
    count = max(1, -(-n // size))
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def tile_grid(h: int, w: int, tile: int, halo: int) -> list[Tile]:
    """Tiles of at most ``tile`` latent pixels per core side over an h x w latent."""
    if tile < 1:
        raise ValueError(f"the tile size must be at least one latent pixel, got {tile}")
    return [
        Tile((r0, r1, c0, c1), (max(0, r0 - halo), min(h, r1 + halo), max(0, c0 - halo), min(w, c1 + halo)))
        for r0, r1 in _spans(h, tile)
        for c0, c1 in _spans(w, tile)
    ]


def _ramp(start: int, stop: int, core: tuple[int, int], n: int, margin: int, unit: int) -> torch.Tensor:
    """Blending weights along one axis over output pixels [start, stop): 1 on the core, falling
    linearly to 0 across the 2 * margin latent pixels shared with each neighbour, so that the
    weights of overlapping tiles sum to one."""
    p = torch.arange(start, stop, dtype=torch.float32) + 0.5
    width = 2 * margin * unit
    w = torch.ones(stop - start)
    if core[0] > 0:
        w = w * ((p - (core[0] - margin) * unit) / width).clamp(0, 1)
    if core[1] < n:
        w = w * (((core[1] + margin) * unit - p) / width).clamp(0, 1)
    return w


class _WholeImageStats:
    """GroupNorm statistics of the whole image, accumulated over the tile cores (per module,
    sample and group: count, mean, sum of squared deviations; merged in float64 with Chan et
    al.'s pairwise update) while the tiles are normalised with `using`: each tile's own statistics
    while it is None, else those of an earlier pass. Installed with `group_norm_override`."""

    def __init__(self):
        self.moments: dict[GroupNorm32, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.using: dict[GroupNorm32, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.collect = True
        self.core: tuple[int, int, int, int] = (0, 0, 0, 0)  # the tile's core within its region
        self.region_rows = 1  # the region's height in latent pixels

    def next_pass(self) -> None:
        """From now on normalise with the statistics collected so far, and collect afresh."""
        if self.moments:
            self.using = {norm: (mean, m2 / n) for norm, (n, mean, m2) in self.moments.items()}
        self.moments = {}

    def __call__(self, norm: GroupNorm32, x: torch.Tensor) -> torch.Tensor:
        if self.collect:
            self._add(norm, x)
        return norm.normalize(x) if self.using is None else norm.normalize(x, *self.using[norm])

    def _add(self, norm: GroupNorm32, x: torch.Tensor) -> None:
        s = x.shape[-2] // self.region_rows  # this map's pixels per latent pixel
        r0, r1, c0, c1 = (v * s for v in self.core)
        core = x[..., r0:r1, c0:c1].unflatten(1, (norm.num_groups, -1))  # a view: no copy in float32
        var, mean = torch.var_mean(core if core.dtype == torch.float32 else core.float(), dim=(2, 3, 4), correction=0)
        n_b = core[0, 0].numel()
        mean_b, m2_b = mean.double(), var.double() * n_b
        if norm in self.moments:
            n_a, mean_a, m2_a = self.moments[norm]
            delta, n = mean_b - mean_a, n_a + n_b
            self.moments[norm] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta**2 * n_a * n_b / n)
        else:
            self.moments[norm] = (n_b, mean_b, m2_b)


def _tile_passes(
    stage: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tiles: list[Tile],
    units: tuple[int, int],
    passes: int,
    margin: int,
) -> Iterator[torch.Tensor]:
    """``stage`` over every tile of ``x``, ``passes`` times, yielding the assembled result after
    each pass. ``units``: pixels per latent pixel of ``stage``'s input and output; ``margin``:
    latent pixels blended beyond each core (0: cores pasted)."""
    if passes < 1:
        raise ValueError(f"tiling needs at least one pass, got {passes}")
    u_in, u_out = units
    h, w = x.shape[-2] // u_in, x.shape[-1] // u_in
    whole = _WholeImageStats()
    for i in range(passes):
        whole.collect = i < passes - 1
        out = torch.zeros(0)
        weight = torch.zeros(h * u_out, w * u_out, device=x.device)
        # The override holds only while the tiles run: never across a yield, into the caller's code.
        with group_norm_override(whole):
            for tile in tiles:
                (t0, t1, l0, l1), (r0, r1, c0, c1) = tile.region, tile.core
                whole.core, whole.region_rows = (r0 - t0, r1 - t0, c0 - l0, c1 - l0), t1 - t0
                y = stage(x[..., t0 * u_in : t1 * u_in, l0 * u_in : l1 * u_in])
                if not out.numel():
                    out = torch.zeros(*y.shape[:2], *weight.shape, dtype=torch.float32, device=x.device)
                # The output span: the core and `margin` latent pixels around it (within the region).
                top, bottom = max(0, r0 - margin), min(h, r1 + margin)
                left, right = max(0, c0 - margin), min(w, c1 + margin)
                ramp = _ramp(top * u_out, bottom * u_out, (r0, r1), h, margin, u_out)[:, None]
                ramp = ramp * _ramp(left * u_out, right * u_out, (c0, c1), w, margin, u_out)[None, :]
                ramp = ramp.to(x.device)
                rows, cols = slice(top * u_out, bottom * u_out), slice(left * u_out, right * u_out)
                mine = (
                    slice((top - t0) * u_out, (bottom - t0) * u_out),
                    slice((left - l0) * u_out, (right - l0) * u_out),
                )
                out[..., rows, cols] += y[..., mine[0], mine[1]].float() * ramp
                weight[rows, cols] += ramp
                del y  # before the next tile runs
        yield (out / weight).to(x.dtype)
        whole.next_pass()


# --- Decoding and encoding ------------------------------------------------------------------


def _settings(passes: int, halo: int, margin: int | None) -> int:
    """The blending margin: by default none once whole-image statistics make the cores agree,
    the whole halo when each tile keeps its own (one pass)."""
    return (halo if passes == 1 else 0) if margin is None else min(margin, halo)


@torch.no_grad()
def decode_passes(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    tile: int = DEFAULT_TILE,
    halo: int | None = None,
    passes: int = DEFAULT_PASSES,
    margin: int | None = None,
) -> Iterator[torch.Tensor]:
    """The images of `decode_tiled` after each pass (for measuring how they converge)."""
    f = vae.config.downscale
    halo = decoder_reach(vae.config) if halo is None else halo
    tiles = tile_grid(latents.shape[-2], latents.shape[-1], max(1, tile // f), halo)
    if len(tiles) == 1:
        yield vae.decode(latents)
        return
    stem = vae.decoder.stem(vae.post_quant_conv(latents / vae.config.scaling_factor))
    yield from _tile_passes(vae.decoder.up_path, stem, tiles, (1, f), passes, _settings(passes, halo, margin))


def decode_tiled(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    tile: int = DEFAULT_TILE,
    halo: int | None = None,
    passes: int = DEFAULT_PASSES,
    margin: int | None = None,
) -> torch.Tensor:
    """`vae.decode(latents)` tile by tile: scaled latents [B, z, h, w] -> images [B, 3, fh, fw].

    ``tile``: pixels per side of a tile's core (a multiple of the VAE's downscale); ``halo``:
    latent pixels around each core (default: the up path's receptive field, which makes the
    convolutions exact); ``passes``: 1 normalises each tile with its own statistics and blends
    the overlaps; each further pass normalises with the whole-image statistics gathered in the
    pass before, which converge to the untiled ones (docs/benchmarks.md); ``margin``: latent
    pixels blended beyond each core (default: the halo with one pass, none after). A latent that
    fits in one tile is decoded whole."""
    return deque(decode_passes(vae, latents, tile, halo, passes, margin), maxlen=1).pop()  # the last pass's


@torch.no_grad()
def _encoder_features(vae: AutoencoderKL, images: torch.Tensor, tile: int, halo: int | None, passes: int, margin):
    """The down path's output over the whole latent after each pass (whole at once if one tile)."""
    f = vae.config.downscale
    if images.shape[-1] % f or images.shape[-2] % f:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f}")
    halo = encoder_reach(vae.config) if halo is None else halo
    tiles = tile_grid(images.shape[-2] // f, images.shape[-1] // f, max(1, tile // f), halo)
    if len(tiles) == 1:
        yield vae.encoder.down_path(images)
        return
    margin = _settings(passes, halo, margin)
    yield from _tile_passes(vae.encoder.down_path, images, tiles, (f, 1), passes, margin)


@torch.no_grad()
def _posterior(vae: AutoencoderKL, features: torch.Tensor) -> DiagonalGaussian:
    return DiagonalGaussian(vae.quant_conv(vae.encoder.head(features)), vae.config.scaling_factor)


def encode_passes(
    vae: AutoencoderKL,
    images: torch.Tensor,
    tile: int = DEFAULT_TILE,
    halo: int | None = None,
    passes: int = DEFAULT_PASSES,
    margin: int | None = None,
) -> Iterator[DiagonalGaussian]:
    """The posteriors of `encode_tiled` after each pass (for measuring how they converge)."""
    for features in _encoder_features(vae, images, tile, halo, passes, margin):
        yield _posterior(vae, features)


def encode_tiled(
    vae: AutoencoderKL,
    images: torch.Tensor,
    tile: int = DEFAULT_TILE,
    halo: int | None = None,
    passes: int = DEFAULT_PASSES,
    margin: int | None = None,
) -> DiagonalGaussian:
    """`vae.encode(images)` tile by tile: the down path tiled (``halo`` defaults to its receptive
    field), the mid block and the rest on the whole latent; the options as for `decode_tiled`."""
    features = _encoder_features(vae, images, tile, halo, passes, margin)
    return _posterior(vae, deque(features, maxlen=1).pop())
