"""End to end against diffusers' pipelines: the same tiny random weights, prompt, seed and settings
give the same image (every pixel within 1/255) for txt2img, img2img and inpainting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import build_reference, save_reference_folder

from stablediff.loading import load_pipeline
from stablediff.params import GenerationParams

# our sampler/schedule -> diffusers scheduler class name and its options
SAMPLERS = {
    ("ddim", "default"): ("DDIMScheduler", {}),
    ("euler", "default"): ("EulerDiscreteScheduler", {}),
    ("dpmpp_2m", "karras"): ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("unipc", "default"): ("UniPCMultistepScheduler", {}),
}
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference parts, our pipeline) for an SD1-style and a 9-channel inpainting model."""
    out = {}
    for name, channels in (("sd1", 4), ("inpaint", 9)):
        parts = build_reference("sd1", seed=11, in_channels=channels)
        folder = save_reference_folder(tmp_path_factory.mktemp(name), *parts)
        out[name] = (parts, folder, load_pipeline(folder))
    return out


def _reference_pipeline(kind: str, parts, folder, scheduler: str, options: dict):
    import diffusers
    from transformers import CLIPTokenizer

    unet, vae, text, _, _ = parts
    scheduler_cls = getattr(diffusers, scheduler)
    if scheduler == "DDIMScheduler":  # SD's own DDIM settings
        options = {**options, "set_alpha_to_one": False, "clip_sample": False}
    sched = scheduler_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **options)
    cls = {
        "txt2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[kind]
    return cls(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _test_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    return Image.fromarray(mask)


def _compare(ours: Image.Image, reference: np.ndarray, what: str) -> None:
    expected = (reference * 255).round().astype(np.int16)
    got = np.asarray(ours).astype(np.int16)
    diff = np.abs(got - expected).max()
    print(f"{what}: max pixel difference {diff}/255")
    assert diff <= 1, what


@pytest.mark.parametrize(("sampler", "schedule"), list(SAMPLERS))
@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint", "inpaint-9ch"])
def test_pipeline_matches_diffusers(models, kind, sampler, schedule):
    parts, folder, pipe = models["inpaint" if kind == "inpaint-9ch" else "sd1"]
    scheduler, options = SAMPLERS[(sampler, schedule)]
    ref = _reference_pipeline(kind.split("-")[0], parts, folder, scheduler, options)
    params = GenerationParams(
        PROMPT,
        negative_prompt=NEGATIVE,
        width=64,
        height=64,
        steps=9,
        guidance_scale=7.5,
        sampler=sampler,
        schedule=schedule,
        seed=1234,
    )
    call = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "num_inference_steps": 9,
        "guidance_scale": 7.5,
        "generator": torch.Generator().manual_seed(1234),
        "output_type": "np",
    }
    if kind == "txt2img":
        call.update(height=64, width=64)
    elif kind == "img2img":
        params.init_image, params.strength = _test_image(1), 0.6
        call.update(image=params.init_image, strength=0.6)
    else:
        params.init_image, params.mask, params.strength = _test_image(2), _mask(), 1.0
        call.update(image=params.init_image, mask_image=params.mask, height=64, width=64, strength=1.0)
    with torch.no_grad():
        expected = ref(**call).images[0]
    _compare(pipe.generate(params)[0], expected, f"{kind} {sampler} {schedule}")


def test_inpaint_partial_strength_matches_diffusers(models):
    parts, folder, pipe = models["sd1"]
    ref = _reference_pipeline("inpaint", parts, folder, "DDIMScheduler", {})
    image, mask = _test_image(3), _mask()
    params = GenerationParams(
        PROMPT, width=64, height=64, steps=10, sampler="ddim", seed=7, init_image=image, mask=mask, strength=0.7
    )
    with torch.no_grad():
        expected = ref(
            PROMPT,
            image=image,
            mask_image=mask,
            height=64,
            width=64,
            strength=0.7,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
        ).images[0]
    _compare(pipe.generate(params)[0], expected, "inpaint strength 0.7")


def test_explicit_latents_match_diffusers(models):
    parts, folder, pipe = models["sd1"]
    ref = _reference_pipeline("txt2img", parts, folder, "EulerDiscreteScheduler", {})
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(99))  # tiny VAE: 2x downscale
    params = GenerationParams(PROMPT, width=64, height=64, steps=8, sampler="euler", seed=0, latents=latents)
    with torch.no_grad():
        expected = ref(
            PROMPT, height=64, width=64, num_inference_steps=8, latents=latents.clone(), output_type="np"
        ).images[0]
    _compare(pipe.generate(params)[0], expected, "explicit latents")


def _generate_batched(pipe, params: GenerationParams) -> list[Image.Image]:
    """generate with the images of the batch together, as on CUDA (the fixture's pipe is shared)."""
    pipe.batch_images = True
    try:
        return pipe.generate(params)
    finally:
        pipe.batch_images = None


@pytest.mark.parametrize("kind", ["txt2img", "inpaint", "inpaint-9ch"])
def test_batched_images_equal_images_run_one_at_a_time(models, kind):
    """Images run through the U-Net together (the default on CUDA), each with its own generator,
    are the images run one at a time (the CPU default) within rounding. Euler ancestral draws fresh
    noise every step, per image."""
    _, _, pipe = models["inpaint" if kind == "inpaint-9ch" else "sd1"]
    params = GenerationParams(
        PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=6, sampler="euler_a", seed=40, batch_size=3
    )
    if kind != "txt2img":
        params.init_image, params.mask, params.strength = _test_image(4), _mask(), 1.0
    apart = pipe.generate(params)
    together = _generate_batched(pipe, params)
    for k, (a, b) in enumerate(zip(together, apart, strict=True)):
        _compare(a, np.asarray(b) / 255.0, f"{kind} image {k}, batched vs one at a time")


def test_batched_images_match_diffusers_with_a_generator_per_image(models):
    """diffusers' txt2img with one generator per image gives the same batch. (Its img2img and
    inpainting pipelines draw the init image's posterior sample from the first generator only, so
    there image k > 0 differs from a batch of one with seed + k; ours keeps image k = seed + k.)"""
    parts, folder, pipe = models["sd1"]
    ref = _reference_pipeline("txt2img", parts, folder, "EulerAncestralDiscreteScheduler", {})
    params = GenerationParams(PROMPT, width=64, height=64, steps=6, sampler="euler_a", seed=40, batch_size=3)
    with torch.no_grad():
        expected = ref(
            PROMPT,
            height=64,
            width=64,
            num_inference_steps=6,
            num_images_per_prompt=3,
            output_type="np",
            generator=[torch.Generator().manual_seed(40 + k) for k in range(3)],
        ).images
    images = _generate_batched(pipe, params)
    for k, (image, reference) in enumerate(zip(images, expected, strict=True)):
        _compare(image, reference, f"batched txt2img image {k}")
