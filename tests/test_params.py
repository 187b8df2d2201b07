"""GenerationParams: validation messages, JSON and AUTOMATIC1111 infotext round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from stablediff.params import A1111_SAMPLERS, GenerationParams, parse_a1111

SAMPLERS = sorted(A1111_SAMPLERS)


def check(**fields):
    GenerationParams(**{"prompt": "a cat", **fields}).validate(SAMPLERS)


def test_defaults_are_valid():
    params = GenerationParams("a cat")
    assert params.validate(SAMPLERS) is params
    assert (params.width, params.height, params.steps, params.sampler, params.clip_skip) == (
        None,
        None,
        20,
        "dpmpp_2m",
        1,
    )


def test_size_none_is_the_models_own():
    """A width/height of None means the model's own size: valid, filled in by `with_default_size`,
    left out of A1111 text and kept as null in JSON; a stored size is kept."""
    params = GenerationParams("a cat", height=256)
    assert params.validate(SAMPLERS) is params
    sized = params.with_default_size(64)
    assert (sized.width, sized.height) == (64, 256) and params.width is None
    assert sized.with_default_size(8) is sized
    assert "Size:" not in params.to_a1111() and "Size: 64x256" in sized.to_a1111()
    assert GenerationParams.from_json_dict(params.to_json_dict()) == params
    back = GenerationParams.from_a1111(params.to_a1111())
    assert (back.width, back.height) == (None, None)
    back = GenerationParams.from_a1111(sized.to_a1111())
    assert (back.width, back.height) == (64, 256)
    assert GenerationParams.from_json_dict(json.loads(json.dumps(sized.to_json_dict()))) == sized


def test_default_sampler_list_is_the_registry():
    from stablediff.diffusion import samplers

    GenerationParams("a cat", sampler=next(iter(samplers.SAMPLERS))).validate()
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        GenerationParams("a cat", sampler="nope").validate()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 500}, r"width must be a positive multiple of 8, got 500"),
        ({"height": 0}, r"height must be a positive multiple of 8, got 0"),
        ({"height": -8}, r"height must be a positive multiple of 8, got -8"),
        ({"width": 512.0}, r"width must be a positive multiple of 8, got 512.0"),
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"clip_skip": 0}, r"clip_skip must be an int >= 1, got 0"),
        ({"guidance_scale": math.nan}, r"guidance_scale must be a finite number, got nan"),
        ({"guidance_scale": math.inf}, r"guidance_scale must be a finite number, got inf"),
        ({"guidance_rescale": math.nan}, r"guidance_rescale must be a finite number, got nan"),
        ({"guidance_rescale": 1.5}, r"guidance_rescale must be in \[0, 1\], got 1.5"),
        ({"strength": -0.1}, r"strength must be in \[0, 1\], got -0.1"),
        ({"strength": 1.01}, r"strength must be in \[0, 1\], got 1.01"),
        ({"seed": -1}, r"seed must be an int in \[0, 2\*\*64\), got -1"),
        ({"seed": 2**64}, r"seed must be an int in \[0, 2\*\*64\), got 18446744073709551616"),
        ({"seed": "7"}, r"seed must be an int in \[0, 2\*\*64\), got '7'"),
        ({"schedule": "linear"}, r"unknown schedule 'linear'; valid choices: default, karras, exponential"),
        ({"prompt": None}, r"prompt must be a str, got NoneType"),
        ({"init_image": 3}, r"init_image must be None, a PIL image or a path, got int"),
        ({"mask": "m.png"}, r"a mask needs an init_image"),
    ],
)
def test_validation_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        check(**fields)


def test_sampler_error_lists_sorted_choices():
    with pytest.raises(ValueError) as info:
        GenerationParams("a", sampler="dpm_fast").validate(["euler", "ddim", "lms"])
    assert str(info.value) == "unknown sampler 'dpm_fast'; valid choices: ddim, euler, lms"


def test_strength_that_leaves_zero_steps():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"strength 0.04 with 20 steps leaves zero steps"):
        check(init_image=img, strength=0.04)
    check(init_image=img, strength=0.05)  # int(20 * 0.05) == 1
    check(strength=0.0)  # txt2img ignores strength


def test_latent_shape_checked():
    check(latents=torch.zeros(2, 4, 64, 32), batch_size=2, width=256, height=512)
    check(latents=torch.zeros(1, 4, 32, 32))  # the spatial size depends on the VAE: the pipeline checks it
    with pytest.raises(ValueError, match=r"got \[2, 4, 64, 64\]"):
        check(latents=torch.zeros(2, 4, 64, 64))
    with pytest.raises(ValueError, match=r"got \[4, 64, 64\]"):
        check(latents=torch.zeros(4, 64, 64))
    with pytest.raises(ValueError, match="latents must be a torch.Tensor"):
        check(latents=[[0.0]])


def test_json_round_trip(tmp_path):
    params = GenerationParams(
        "a (cat:1.2)",
        negative_prompt="dog",
        width=640,
        height=384,
        steps=31,
        guidance_scale=5.0,
        guidance_rescale=0.7,
        sampler="euler_a",
        schedule="karras",
        seed=2**63 + 5,
        batch_size=2,
        clip_skip=2,
        strength=0.5,
        init_image=tmp_path / "in.png",
        mask=Image.new("L", (8, 8)),
        latents=torch.zeros(2, 4, 48, 80),
    )
    data = json.loads(json.dumps(params.to_json_dict()))
    assert data["init_image"] == str(tmp_path / "in.png") and data["init_image_given"] is True
    assert data["mask"] is None and data["mask_given"] is True  # an in-memory image cannot be stored
    assert data["latents"] is None and data["latents_given"] is True
    back = GenerationParams.from_json_dict(data)
    for name in (
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "guidance_rescale",
        "sampler",
        "schedule",
        "seed",
        "batch_size",
        "clip_skip",
        "strength",
    ):
        assert getattr(back, name) == getattr(params, name), name
    assert back.init_image == str(tmp_path / "in.png") and back.mask is None and back.latents is None


def test_json_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown GenerationParams keys \['cfg'\]"):
        GenerationParams.from_json_dict({"prompt": "a", "cfg": 7})
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        GenerationParams.from_json_dict({"steps": 3})


def test_a1111_text_format():
    params = GenerationParams(
        "a cat, sitting",
        negative_prompt="blurry",
        width=512,
        height=512,
        steps=20,
        sampler="dpmpp_2m",
        schedule="karras",
        guidance_scale=7.5,
        seed=1,
        clip_skip=2,
    )
    text = params.to_a1111(model_hash="6ce0161689", model_name="v1-5-pruned-emaonly")
    lines = text.split("\n")
    assert lines[:2] == ["a cat, sitting", "Negative prompt: blurry"]
    assert lines[2].startswith(
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, "
        "Version: stablediff "
    )
    assert "Denoising strength" not in text  # txt2img: A1111 leaves it out
    assert "Negative prompt" not in GenerationParams("a").to_a1111()


def test_a1111_round_trip_with_quoted_values():
    params = GenerationParams(
        "a (cat:1.2), [dog]\nsecond line",
        negative_prompt="ugly, blurry",
        width=768,
        height=512,
        steps=12,
        guidance_scale=4.0,
        guidance_rescale=0.25,
        sampler="euler_a",
        schedule="exponential",  # "default" is written as the A1111 type it equals (tests/test_a1111.py)
        seed=42,
        clip_skip=3,
        strength=0.6,
        init_image=Image.new("RGB", (8, 8)),
    )
    text = params.to_a1111(model_hash="abc", model_name="my model, v2: final")
    assert 'Model: "my model, v2: final"' in text  # a value with "," or ":" is JSON-quoted
    info = parse_a1111(text)
    assert info["Model"] == "my model, v2: final" and info["Denoising strength"] == "0.6"
    assert info["Prompt"] == params.prompt and info["Negative prompt"] == "ugly, blurry"
    back = GenerationParams.from_a1111(text)
    for name in (
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "guidance_rescale",
        "sampler",
        "schedule",
        "seed",
        "clip_skip",
        "strength",
    ):
        assert getattr(back, name) == getattr(params, name), name


def test_parse_a1111_real_world_text():
    text = (
        "masterpiece, (1girl:1.2)\nNegative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3862913370, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.7, Clip skip: 2, "
        'Lora hashes: "add_detail: 7c6bad76eb54, x: 1", Version: v1.6.0'
    )
    info = parse_a1111(text)
    assert info["Lora hashes"] == "add_detail: 7c6bad76eb54, x: 1"
    assert info["Version"] == "v1.6.0" and info["Size"] == "512x768"
    params = GenerationParams.from_a1111(text)
    assert (params.sampler, params.schedule) == ("dpmpp_2m", "karras")  # pre-1.9 "DPM++ 2M Karras"
    assert (params.width, params.height, params.seed, params.guidance_scale) == (512, 768, 3862913370, 7.0)


def test_parse_a1111_prompt_only():
    assert parse_a1111("just a prompt, with: colon") == {"Prompt": "just a prompt, with: colon", "Negative prompt": ""}
    with pytest.raises(ValueError, match="'Steps' has a bad value 'x'"):
        GenerationParams.from_a1111("p\nSteps: x, Sampler: Euler, Seed: 1")
