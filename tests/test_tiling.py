"""Tiled VAE decoding and encoding (stablediff.tiling) against the untiled passes, on small random
VAEs with tiles that do not divide the image; the auto/always/never choice; the memory estimate
against a measured peak.

Tolerance: tiled passes compute what the untiled ones compute (exact halos, the whole image's
GroupNorm statistics), so they agree to float rounding: 1e-4 on images in [-1, 1] (measured: a
few 1e-6), 1e-5 relative on latents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stablediff.loading import load_pipeline
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.nn import randomize_
from stablediff.params import GenerationParams
from stablediff.tiling import (
    _decoder_plans,
    _decoder_stages,
    _encoder_plans,
    _encoder_stages,
    decode_bytes,
    decode_tiled,
    encode_bytes,
    encode_tiled,
    tile_grid,
    use_tiling,
)

# Three levels (downscale 4), few channels: milliseconds per pass.
SMALL = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return randomize_(AutoencoderKL(SMALL), torch.Generator().manual_seed(0)).eval()


def _latent(h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Noise whose scale changes across the image, plus a blob: tiles see different statistics."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.3, 1.7, w)
    return torch.randn(1, 4, h, w, generator=g) * ramp + torch.linspace(-1, 1, h)[:, None]


def _report(what: str, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.float() - b.float()).abs().flatten()
    worst, p999 = diff.max().item(), torch.quantile(diff, 0.999).item()
    print(f"{what}: max |diff| {worst:.2e}, 99.9th percentile {p999:.2e}")
    return worst, p999


def test_stage_reach_of_the_sd_vae():
    """Grid pixels each stage's core depends on: the halo that makes tiles exact."""
    assert [p.reach for p in _decoder_plans(VAEConfig())] == [6, 4, 4, 4]
    assert [p.reach for p in _encoder_plans(VAEConfig())] == [4, 3, 3, 4]


def test_stages_are_the_paths_regrouped(vae):
    z, images = _latent(6, 7), torch.rand(1, 3, 24, 28) * 2 - 1
    with torch.no_grad():
        h = vae.decoder.stem(z)
        for stage, _ in _decoder_stages(vae):
            h = stage(h)
        assert torch.equal(h, vae.decoder.up_path(vae.decoder.stem(z)))
        x = images
        for stage, _ in _encoder_stages(vae):
            x = stage(x)
        assert torch.equal(x, vae.encoder.down_path(images))


@pytest.mark.parametrize(("h", "w", "tile"), [(13, 22, 5), (16, 16, 4), (9, 30, 7)])
def test_tile_grid_cores_partition_the_latent(h, w, tile):
    tiles = tile_grid(h, w, tile, halo=3)
    covered = torch.zeros(h, w, dtype=torch.int64)
    for t in tiles:
        r0, r1, c0, c1 = t.core
        t0, t1, l0, l1 = t.region
        assert 0 < r1 - r0 <= tile and 0 < c1 - c0 <= tile
        assert t0 == max(0, r0 - 3) and t1 == min(h, r1 + 3) and l0 == max(0, c0 - 3) and l1 == min(w, c1 + 3)
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()  # no gaps, no overlaps
    sides = {t.core[1] - t.core[0] for t in tiles} | {t.core[3] - t.core[2] for t in tiles}
    assert max(sides) - min(sides) <= max(1, tile - 1)  # nearly equal spans, no sliver


@pytest.mark.parametrize(("h", "w", "tile_px"), [(13, 22, 20), (24, 24, 32), (10, 31, 16)])
def test_decode_tiled_matches_untiled(vae, h, w, tile_px):
    z = _latent(h, w)
    assert len(tile_grid(h, w, tile_px // 4, 0)) > 2
    with torch.no_grad():
        ref = vae.decode(z)
        tiled = decode_tiled(vae, z, tile=tile_px)
    assert tiled.shape == ref.shape and tiled.dtype == ref.dtype
    worst, p999 = _report(f"decode {h}x{w} latent, {tile_px} px tiles", tiled, ref)
    assert worst < 1e-4 and p999 < 1e-4


def test_encode_tiled_matches_untiled(vae):
    images = torch.rand(1, 3, 52, 88, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(images)
        tiled = encode_tiled(vae, images, tile=20)
    scale = ref.mean.abs().max().item()
    assert _report("encode mean", tiled.mean, ref.mean)[0] < 1e-5 * scale
    assert _report("encode std", tiled.std, ref.std)[0] < 1e-5 * ref.std.abs().max().item()
    with pytest.raises(ValueError, match="multiple of 4"):
        encode_tiled(vae, images[..., :50], tile=20)


def test_one_tile_is_the_untiled_pass(vae):
    z = _latent(8, 8)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decode_tiled(vae, z, tile=64), vae.decode(z))
        assert torch.equal(encode_tiled(vae, images, tile=64).mean, vae.encode(images).mean)


def test_half_precision_tiles(vae):
    half = randomize_(AutoencoderKL(SMALL), torch.Generator().manual_seed(0)).eval().to(torch.bfloat16)
    z = _latent(32, 32)
    with torch.no_grad():
        tiled = decode_tiled(half, z.to(torch.bfloat16), tile=16)
        untiled, exact = half.decode(z.to(torch.bfloat16)), vae.decode(z)
    assert tiled.dtype == torch.bfloat16
    # Tiling adds little to what bf16 itself costs.
    assert _report("bf16 tiled vs fp32", tiled, exact)[1] < 1.5 * _report("bf16 vs fp32", untiled, exact)[1]


def test_use_tiling_modes():
    assert use_tiling("auto", 10, 100) is False
    assert use_tiling("auto", 1000, 100) is True
    assert use_tiling("auto", 1000, None) is False  # no budget known: as before tiling existed
    assert use_tiling("always", 1, 100) is True and use_tiling("never", 1000, 1) is False
    with pytest.raises(ValueError, match="auto"):
        use_tiling("sometimes", 1, 1)


def test_pipeline_tiles_only_above_the_budget(monkeypatch):
    pipe = load_pipeline("tiny")
    pipe.vae_tile_size = 16  # 8 latent pixels: a 64x64 image is 4x4 tiles
    params = GenerationParams("a red circle", width=64, height=64, steps=2, seed=3)
    calls = []
    import stablediff.pipeline as pipeline_module

    real = pipeline_module.decode_tiled
    monkeypatch.setattr(pipeline_module, "decode_tiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    untiled_estimate = decode_bytes(pipe.vae.config, 64, 64)

    pipe.vae_memory_budget = untiled_estimate  # fits: untiled
    assert not pipe.uses_vae_tiling(64, 64)
    reference = pipe.generate(params)[0]
    assert not calls

    pipe.vae_memory_budget = untiled_estimate - 1  # a small budget forces tiling
    assert pipe.uses_vae_tiling(64, 64)
    tiled = pipe.generate(params)[0]
    assert calls
    diff = (
        torch.from_numpy(np.asarray(tiled, dtype=np.int16)) - torch.from_numpy(np.asarray(reference, dtype=np.int16))
    ).abs()
    print(f"tiny pipeline, 4x4 tiles: max {diff.max().item()}/255, unchanged: {(diff == 0).float().mean():.4%}")
    assert diff.max() <= 1  # the same image up to float rounding

    pipe.vae_tiling, pipe.vae_memory_budget = "never", 1
    assert not pipe.uses_vae_tiling(64, 64)
    pipe.vae_tiling, pipe.vae_memory_budget = "always", None
    assert pipe.uses_vae_tiling(64, 64) and pipe.uses_vae_tiling(64, 64, encode=True)


def test_estimates_shrink_with_tiles_and_grow_with_size():
    sd = VAEConfig()
    small, large = decode_bytes(sd, 512, 512), decode_bytes(sd, 2048, 2048)
    assert 14 < large / small < 17  # activations scale with pixels
    assert decode_bytes(sd, 2048, 2048, tile=512) < large / 3
    assert decode_bytes(sd, 2048, 2048, tile=512) < decode_bytes(sd, 4096, 4096, tile=512)  # the stem grows
    assert encode_bytes(sd, 2048, 2048, tile=512) < encode_bytes(sd, 2048, 2048) / 3
    assert decode_bytes(sd, 512, 512, tile=512) == small  # one tile: untiled
    assert decode_bytes(sd, 512, 512, itemsize=2) < small


_MEASURE = """
import json, sys, torch
from pathlib import Path
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.tiling import decode_bytes, decode_tiled

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

torch.set_num_threads(1)
cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)
vae = AutoencoderKL(cfg).eval()
z = torch.randn(1, 4, 128, 128)
tile = None if sys.argv[1] == "never" else 128
with torch.no_grad():  # one-time costs (kernel set-up, thread pools) are not the decode's
    vae.decode(torch.randn(1, 4, 8, 8))
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
base = status("VmRSS:")
with torch.no_grad():
    out = decode_tiled(vae, z, tile=tile) if tile else vae.decode(z)
print(json.dumps({"measured": status("VmHWM:") - base, "estimate": decode_bytes(cfg, 512, 512, 4, tile)}))
"""


@pytest.mark.parametrize("mode", ["never", "always"])
def test_estimate_is_near_the_measured_peak(mode):
    """The estimate against the peak RSS of a decode in a fresh process (the activations only:
    the peak above the RSS once the model and input exist). Linux: /proc/self/status."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to restart the peak")
    out = subprocess.run([sys.executable, "-c", _MEASURE, mode], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)
    ratio = row["estimate"] / row["measured"]
    print(f"{mode}: estimate {row['estimate'] / 2**20:.0f} MiB, measured {row['measured'] / 2**20:.0f} MiB")
    assert 0.6 < ratio < 1.4  # small maps carry relatively more allocator overhead
