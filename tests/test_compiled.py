"""The compiled U-Net (stablediff.compiled, `--compile`): the same images as eager within rounding,
its code cached on disk, and LoRAs refused in both orders. Compiling needs a C++ compiler (g++),
which CI installs; the first compile of the tiny U-Net takes about half a minute on two cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablediff import GenerationParams, load_pipeline
from stablediff.cli import main
from stablediff.compiled import CACHE_ENV, is_compiled
from stablediff.pipeline import StableDiffusion
from tests.test_addons_cli import write_lora

PARAMS = GenerationParams("a red circle", steps=3, seed=2, sampler="dpmpp_2m")


def test_compiled_images_equal_eager_and_the_code_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))  # restored after the test
    pipe = load_pipeline("tiny")
    eager = np.asarray(pipe.generate(PARAMS)[0], dtype=np.int16)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(2, 77, pipe.spec.unet.context_dim)
    with torch.no_grad():
        eager_out = pipe.unet(x, torch.tensor([500.0]), ctx)
    cache = tmp_path / "inductor"
    assert pipe.compile(cache_dir=cache) is pipe and is_compiled(pipe.unet)
    compiled = np.asarray(pipe.generate(PARAMS)[0], dtype=np.int16)
    with torch.no_grad():
        compiled_out = pipe.unet(x, torch.tensor([500.0]), ctx)
    diff = (compiled_out - eager_out).abs().max().item()
    print(f"compiled U-Net vs eager: max abs diff {diff:.2e}; image max {np.abs(compiled - eager).max()}/255")
    assert diff < 1e-4
    assert np.abs(compiled - eager).max() <= 1
    assert any(cache.rglob("*.py")) or any(cache.rglob("*.so"))  # the generated code is on disk
    assert set(pipe.unet.state_dict()) == set(load_pipeline("tiny").unet.state_dict())  # names unchanged


def test_loras_are_refused_around_compiling(tmp_path):
    folder = write_lora(tmp_path / "loras", load_pipeline("tiny"))
    pipe = load_pipeline("tiny")
    pipe.load_lora(folder / "detail.safetensors")
    with pytest.raises(ValueError, match="LoRAs are loaded \\(detail\\)"):
        pipe.compile(cache_dir=tmp_path / "cache")
    assert not is_compiled(pipe.unet)

    pipe = load_pipeline("tiny").compile(cache_dir=tmp_path / "cache")  # nothing compiles until a call
    with pytest.raises(ValueError, match="the U-Net is compiled"):
        pipe.load_lora(folder / "detail.safetensors")
    pipe.lora_dir = folder
    with pytest.raises(ValueError, match="cannot apply LoRA 'detail'"):
        pipe.generate(GenerationParams("a red circle <lora:detail:0.5>", steps=1))
    assert pipe.loras == {}


def test_the_command_line_compiles_when_asked(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(StableDiffusion, "compile", lambda pipe, cache_dir=None: compiled.append(pipe) or pipe)
    args = ["generate", "a red circle", "--model", "tiny", "--steps", "1", "--out", str(tmp_path)]
    assert main(args) == 0 and compiled == []
    assert main([*args, "--compile", "--overwrite"]) == 0 and len(compiled) == 1
