"""The float16/bfloat16 guard of `StableDiffusion.generate`: a non-finite result is never returned;
the part that overflowed is redone in float32, reported, and the weights come back bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from stablediff.loading import load_pipeline
from stablediff.params import GenerationParams

PARAMS = GenerationParams("a red circle", width=64, height=64, steps=3, seed=5)


def _snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(net: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = net.state_dict()
    return all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in before.items())


def test_fp16_cpu_convolutions_exist():
    """The overflow below is a real float16 one: this torch computes float16 convolutions on the CPU."""
    conv = torch.nn.Conv2d(2, 2, 3).half()
    assert conv(torch.ones(1, 2, 4, 4, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])  # SDXL's VAE is the one known to overflow
def test_vae_overflowing_in_fp16_is_decoded_again_in_fp32(preset, caplog):
    pipe = load_pipeline(preset)
    with torch.no_grad():  # activations of ~1e5 after conv_in: inf in float16, normalised away in float32
        pipe.vae.decoder.conv_in.weight.mul_(3e4)
        pipe.vae.decoder.conv_in.bias.mul_(3e4)
    pipe.vae.half()
    latents = pipe.sample_latents(PARAMS)
    assert not torch.isfinite(pipe.decode(latents)).all()  # the overflow is real
    before = _snapshot(pipe.vae)
    with caplog.at_level(logging.WARNING, logger="stablediff.pipeline"):
        image = pipe.generate(PARAMS)[0]
    assert pipe.last_fallback == ("decode",)
    assert "decode overflowed" in caplog.text and "torch.float16" in caplog.text
    assert _same(pipe.vae, before)  # float16 again, bit for bit
    pipe.vae.float()  # the float16 values in float32: what the fallback decoded with
    assert image.tobytes() == pipe.generate(PARAMS)[0].tobytes()
    assert pipe.last_fallback == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sampling_overflow_stops_at_the_step_and_reruns_in_fp32(dtype, caplog):
    pipe = load_pipeline("tiny")
    reference = pipe.generate(PARAMS)[0]  # float32 throughout
    pipe.to(dtype=dtype)
    # The U-Net's output becomes inf whenever it runs in low precision (an overflow, injected).
    pipe.unet.register_forward_hook(lambda m, a, out: out * float("inf") if out.dtype == dtype else None)
    before = {name: _snapshot(net) for name, net in (("unet", pipe.unet), ("text", pipe.text_encoder))}
    steps, previews = [], []
    with caplog.at_level(logging.WARNING, logger="stablediff.pipeline"):
        image = pipe.generate(PARAMS, callback=lambda i, n: steps.append(i), preview=previews.append)[0]
    assert pipe.last_fallback == ("sampling",)
    assert "sampling overflowed" in caplog.text
    # The low-precision run stopped at its first step, before reporting it: only the rerun's steps.
    assert steps == [1, 2, 3] and len(previews) == 3
    assert all(torch.isfinite(p).all() for p in previews)
    assert _same(pipe.unet, before["unet"]) and _same(pipe.text_encoder, before["text"])
    assert pipe.dtype == dtype
    # The rerun is the float32 sampling (of float16-rounded weights), decoded in low precision.
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 8


def test_what_stays_non_finite_in_fp32_is_an_error():
    pipe = load_pipeline("tiny").to(dtype=torch.float16)
    pipe.unet.register_forward_hook(lambda m, a, out: out * float("nan"))  # in every dtype
    before = _snapshot(pipe.unet)
    with pytest.raises(ValueError, match=r"latents became non-finite .* torch.float16 and again in float32"):
        pipe.generate(PARAMS)
    assert pipe.last_fallback == ("sampling",)
    assert _same(pipe.unet, before)  # restored on the way out of the error too


def test_fp32_runs_unwatched(monkeypatch):
    """In float32 nothing is checked per step (no cost), and a failure is the error at once."""
    pipe = load_pipeline("tiny")
    pipe.unet.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(ValueError, match=r"U-Net in torch.float32: the weights"):
        pipe.generate(PARAMS)
    assert pipe.last_fallback == ()
