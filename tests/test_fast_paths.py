"""The inference shortcuts of issue 20 compute what the plain path computes.

- The U-Net's shared input: one latent row for the [uncond; cond] contexts of guidance equals the
  batch [x; x], and the guidance wrapper uses it.
- GroupNorm on half-precision maps goes straight to PyTorch's kernel (float32 statistics inside).
- Nearest upsampling in the input's dtype.
- The pipeline's convolutions in channels-last layout give the same images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stablediff import GenerationParams, load_pipeline
from stablediff.diffusion import CFGDenoiser, Denoiser, NoiseSchedule
from stablediff.models.unet import UNetConfig, UNetModel
from stablediff.nn import GroupNorm32, randomize_, upsample_nearest

TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, context_dim=16, norm_groups=8)
CONFIGS = {
    "attention at full resolution": UNetConfig(**TINY, attention_levels=(0, 1)),
    "attention at the lower level only": UNetConfig(**TINY, attention_levels=(1,)),
    "middle block only": UNetConfig(**TINY, attention_levels=()),
    "inpainting (concat)": UNetConfig(**{**TINY, "in_channels": 9}, attention_levels=(0, 1)),
    "SDXL-style y": UNetConfig(**TINY, attention_levels=(1,), adm_in_channels=24),
}


def _unet(cfg: UNetConfig) -> UNetModel:
    return randomize_(UNetModel(cfg), torch.Generator().manual_seed(0)).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_shared_input_equals_the_repeated_batch(name):
    cfg = CONFIGS[name]
    net = _unet(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(4, 7, cfg.context_dim, generator=g)  # [uncond; cond], two rows each
    concat = torch.randn(2, 5, 16, 16, generator=g) if cfg.in_channels == 9 else None
    y = torch.randn(4, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    shared = net(x, t, context, concat=concat, y=y)
    twice = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
    batch = net(twice(x), twice(t), context, concat=twice(concat), y=y)
    diff = (shared - batch).abs().max().item()
    print(f"{name}: max |shared - batch| = {diff:.2e}")
    assert shared.shape == batch.shape == (4, 4, 16, 16)
    assert diff < 1e-5


def test_shared_input_rows_must_divide_the_context_rows():
    net = _unet(CONFIGS["attention at full resolution"])
    with pytest.raises(ValueError, match="not a multiple"):
        net(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(3, 7, 16))


@torch.no_grad()
def test_guidance_sends_one_latent_row_per_image():
    net = _unet(CONFIGS["attention at full resolution"])
    seen = []
    net.input_blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    denoiser = Denoiser(net, NoiseSchedule())
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([3.0])
    cond, uncond = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    guided = CFGDenoiser(denoiser, 7.5)(x, sigma, context=cond, uncond_context=uncond)
    assert seen == [1]  # the first layer ran once, for both contexts
    out_uncond, out_cond = denoiser(x, sigma, context=uncond), denoiser(x, sigma, context=cond)
    expected = out_uncond + 7.5 * (out_cond - out_uncond)
    diff = (guided - expected).abs().max().item()
    print(f"guided (shared input) vs two separate calls: max {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_group_norm_has_float32_statistics(dtype):
    g = torch.Generator().manual_seed(3)
    norm = GroupNorm32(8, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        norm.bias.copy_(0.1 * torch.randn(64, generator=g))
    x = 3 + 20 * torch.randn(2, 64, 33, 17, generator=g)  # large mean and spread: half sums would drift
    norm, x = norm.to(dtype), x.to(dtype)
    exact = F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), 1e-6)  # of the half inputs
    half = norm(x).double()
    rounded = exact.to(dtype).double()  # the best a half-precision output can be
    err, best = (half - exact).abs().max().item(), (rounded - exact).abs().max().item()
    print(f"{dtype}: max error {err:.2e}, rounding alone {best:.2e}")
    assert err <= 2 * best


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nearest_upsampling_copies_values(dtype):
    x = torch.randn(1, 3, 5, 7).to(dtype)
    up = upsample_nearest(x)
    assert up.dtype == dtype and up.shape == (1, 3, 10, 14)
    assert torch.equal(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert upsample_nearest(x, size=(11, 15)).shape == (1, 3, 11, 15)


def test_pipeline_runs_channels_last_with_the_same_images():
    pipe = load_pipeline("tiny", seed=0)
    layouts = []
    hook = lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))  # noqa: E731
    pipe.unet.middle_block.register_forward_hook(hook)
    pipe.vae.decoder.conv_in.register_forward_hook(hook)
    params = GenerationParams("a red circle", steps=4, seed=5, sampler="dpmpp_2m")
    fast = np.asarray(pipe.generate(params)[0], dtype=np.int16)
    assert layouts and all(layouts)
    pipe.unet.channels_last = pipe.vae.channels_last = False
    plain = np.asarray(pipe.generate(params)[0], dtype=np.int16)
    assert not layouts[-1]
    diff = np.abs(fast - plain).max()
    print(f"channels-last vs contiguous feature maps: max pixel difference {diff}/255")
    assert diff <= 1
