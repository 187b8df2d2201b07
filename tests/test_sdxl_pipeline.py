"""SDXL end to end against diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline.

Tiny random SDXL-like models (the U-Nets of test_sdxl_unet, a VAE with SDXL's latent scale 0.13025,
CLIP-L and a projected bigG-like tower, two tokenizers) are written by diffusers' own
`save_pretrained` with SDXL base's scheduler_config.json (Euler, "leading"), loaded by our
`load_pipeline(folder)`, and every pixel of the same seed's image must agree within 1/255.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference import _randomize
from test_sdxl_unet import TINY_BASE, TINY_REFINER

from stablediff.loading import load_pipeline
from stablediff.params import GenerationParams
from stablediff.tokenizer import CLIPTokenizer

PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"
# SDXL base's published scheduler_config.json, less the keys diffusers' schedulers ignore
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
}
# our sampler -> the diffusers scheduler made from the folder's config
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=0.13025,
    ).eval()


def _text(width: int, projection: int | None, legacy_ids: bool = True):
    """CLIP-L-like (quick_gelu) or, with a projection, bigG-like (gelu; with `legacy_ids` SDXL's
    published special ids, eos 2, else transformers' defaults, which pool at the first EOS as we do)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1) if projection and legacy_ids else {}
    config = CLIPTextConfig(
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=projection or width,
        **special,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _hf_tokenizer(folder, pad_token: str):
    from transformers import CLIPTokenizer as HFTokenizer

    CLIPTokenizer.default(pad_token=pad_token).save(folder)
    return HFTokenizer.from_pretrained(folder)


def _save(pipe, folder):
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    return folder


def tiny_xl_pipeline(tmp, scheduler, seed: int, text=None):
    """diffusers' StableDiffusionXLPipeline of tiny random networks (seeds ``seed``, ``seed + 1``, ...)
    with our test tokenizers written under ``tmp``; ``text(width, projection)`` builds the text
    towers (default ``_text``)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    text = text or _text
    nets = [UNet2DConditionModel(**TINY_BASE, sample_size=32).eval(), _vae(), text(32, None), text(32, 32)]
    for i, net in enumerate(nets):
        _randomize(net, seed + i)
    unet, vae, text, text_2 = nets
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=_hf_tokenizer(tmp / "tok", "<|endoftext|>"),
        tokenizer_2=_hf_tokenizer(tmp / "tok_2", "!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"base": (diffusers pipeline, folder, ours), "refiner": (...)}."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("sdxl")
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    base = tiny_xl_pipeline(tmp, scheduler, 30)
    vae = base.vae
    refiner_nets = [UNet2DConditionModel(**TINY_REFINER, sample_size=32).eval(), _text(48, 40)]
    for i, net in enumerate(refiner_nets):
        _randomize(net, 40 + i)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=refiner_nets[1],
        tokenizer=None,
        tokenizer_2=_hf_tokenizer(tmp / "tok_r", "!"),
        unet=refiner_nets[0],
        scheduler=scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    out = {}
    for name, pipe in (("base", base), ("refiner", refiner)):
        folder = _save(pipe, tmp / name)
        out[name] = (pipe, folder, load_pipeline(folder))
    return out


def _with_scheduler(pipe, folder, sampler: str):
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_pretrained(folder, subfolder="scheduler")
    return pipe


def _compare(ours: Image.Image, reference: np.ndarray, what: str) -> int:
    expected = (reference * 255).round().astype(np.int16)
    diff = int(np.abs(np.asarray(ours).astype(np.int16) - expected).max())
    print(f"{what}: max pixel difference {diff}/255")
    assert diff <= 1, what
    return diff


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_folder_reads_as_sdxl(models):
    base, refiner = models["base"][2], models["refiner"][2]
    assert base.spec.is_sdxl and not base.spec.is_refiner and base.spec.force_zeros_for_empty_prompt
    assert refiner.spec.is_refiner and refiner.text_encoder_2 is None and not refiner.spec.force_zeros_for_empty_prompt
    assert base.spec.schedule.timestep_spacing == "leading"
    assert (base.tokenizer.pad_token, base.tokenizer_2.pad_token, refiner.tokenizer.pad_token) == (
        "<|endoftext|>",
        "!",
        "!",
    )
    assert base.spec.vae.scaling_factor == 0.13025


CASES = {
    "euler": dict(sampler="euler"),
    "dpmpp_2m": dict(sampler="dpmpp_2m"),
    "ddim": dict(sampler="ddim"),
    "micro-conditioning": dict(
        sampler="euler",
        original_size=(128, 96),
        crops_coords_top_left=(8, 4),
        target_size=(64, 48),
        negative_original_size=(32, 32),
        negative_target_size=(96, 64),
    ),
    "prompt_2, negatives": dict(
        sampler="euler", prompt_2="oil painting", negative_prompt=NEGATIVE, negative_prompt_2="text"
    ),
    "clip skip 2": dict(sampler="euler", clip_skip=2),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_base_matches_diffusers(models, case):
    reference, folder, ours = models["base"]
    kw = dict(CASES[case])
    params = GenerationParams(PROMPT, width=64, height=64, steps=8, guidance_scale=6.0, seed=1234, **kw)
    call = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=8, guidance_scale=6.0, output_type="np")
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2", *(k for k in kw if "size" in k or "crops" in k)):
        if name in kw:
            call[name] = kw[name]
    if "clip_skip" in kw:
        call["clip_skip"] = kw["clip_skip"] - 1  # diffusers counts the layers skipped
    ref = _with_scheduler(reference, folder, kw["sampler"])
    expected = ref(**call, generator=torch.Generator().manual_seed(1234)).images[0]
    _compare(ours.generate(params)[0], expected, case)


@torch.no_grad()
def test_long_prompt_is_chunked_on_both_encoders(models):
    """diffusers truncates at 77 tokens; we encode 75-token chunks on both encoders (as A1111): the
    context is two chunks long and its second half is the second chunk's encoding on both towers."""
    ours = models["base"][2]
    long = ", ".join(f"word{i} thing" for i in range(25))  # 114 tokens
    c = ours.encode_sdxl_prompt(GenerationParams(long, prompt_2=long + " two"))
    assert c.context.shape == (1, 154, 64) and c.uncond_context.shape == (1, 154, 64)
    assert torch.count_nonzero(c.uncond_context) == 0  # force_zeros_for_empty_prompt
    ids = [ours.tokenizer.encode(long)[75:], ours.tokenizer_2.encode(long + " two")[75:]]
    for k, (tok, net, half) in enumerate(
        ((ours.tokenizer, ours.text_encoder, 0), (ours.tokenizer_2, ours.text_encoder_2, 1))
    ):
        chunk = torch.tensor([[tok.bos_id, *ids[k], tok.eos_id] + [tok.pad_id] * (75 - len(ids[k]))])
        expected = net(chunk, skip_layers=1)
        got = c.context[:, 77:, 32 * half : 32 * (half + 1)]
        assert torch.equal(got, expected)
    image = ours.generate(GenerationParams(long, width=64, height=64, steps=2, sampler="euler"))[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@torch.no_grad()
def test_refiner_img2img_matches_diffusers(models, sampler):
    reference, folder, ours = models["refiner"]
    image = _image(3)
    params = GenerationParams(
        PROMPT, negative_prompt=NEGATIVE, init_image=image, strength=0.5, width=64, height=64, steps=8,
        guidance_scale=5.0, sampler=sampler, seed=77, aesthetic_score=7.0, negative_aesthetic_score=2.0,
    )  # fmt: skip
    ref = _with_scheduler(reference, folder, sampler)
    call = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, strength=0.5, num_inference_steps=8)
    call.update(guidance_scale=5.0, aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np")
    expected = ref(**call, generator=torch.Generator().manual_seed(77)).images[0]
    _compare(ours.generate(params)[0], expected, f"refiner img2img {sampler}")


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
@torch.no_grad()
def test_base_to_refiner_hand_off_matches_diffusers(models, sampler):
    """The "ensemble of experts": the base denoises to 0.8 and returns latents, the refiner
    continues from 0.8, as diffusers' denoising_end / denoising_start."""
    (base_ref, base_folder, base), (refiner_ref, refiner_folder, refiner) = models["base"], models["refiner"]
    common = dict(width=64, height=64, steps=10, guidance_scale=5.0, sampler=sampler, seed=5)
    latents = base.sample_latents(GenerationParams(PROMPT, denoising_end=0.8, **common))
    ours = refiner.generate(GenerationParams(PROMPT, denoising_start=0.8, **common), init_latents=latents)[0]

    call = dict(prompt=PROMPT, num_inference_steps=10, guidance_scale=5.0)
    ref_latents = _with_scheduler(base_ref, base_folder, sampler)(
        **call, height=64, width=64, denoising_end=0.8, output_type="latent",
        generator=torch.Generator().manual_seed(5),
    ).images  # fmt: skip
    print(f"hand-off latents ({sampler}): max abs diff {(ref_latents - latents).abs().max():.2e}")
    expected = _with_scheduler(refiner_ref, refiner_folder, sampler)(
        **call, image=ref_latents, denoising_start=0.8, output_type="np", generator=torch.Generator().manual_seed(5)
    ).images[0]
    _compare(ours, expected, f"hand-off {sampler}")


def test_hand_off_needs_both_halves(models):
    base = models["base"][2]
    with pytest.raises(ValueError, match="init_latents"):
        base.generate(GenerationParams(PROMPT, denoising_start=0.8, steps=4))


def test_sdxl_params_round_trip_and_checks():
    params = GenerationParams(
        "a", prompt_2="b", negative_prompt_2="c", original_size=(512, 768), crops_coords_top_left=(3, 4),
        target_size=(256, 384), negative_original_size=(64, 64), negative_target_size=(128, 128),
        aesthetic_score=7.5, negative_aesthetic_score=1.0, denoising_start=0.2, denoising_end=0.9,
    ).validate()  # fmt: skip
    data = json.loads(json.dumps(params.to_json_dict()))
    assert GenerationParams.from_json_dict(data) == params
    assert "prompt_2" not in params.to_a1111()  # A1111 has no keys for them; our record keeps them
    for bad, match in [
        (dict(original_size=(0, 8)), "original_size"),
        (dict(crops_coords_top_left=(1, 2, 3)), "crops_coords_top_left"),
        (dict(denoising_end=1.0), "denoising_end"),
        (dict(denoising_start=0.5, denoising_end=0.5), "below"),
        (dict(aesthetic_score=float("inf")), "aesthetic_score"),
    ]:
        with pytest.raises(ValueError, match=match):
            GenerationParams("a", **bad).validate()


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_tiny_presets_generate_and_save(name, tmp_path):
    from stablediff.loading import save
    from stablediff.presets import PRESETS

    pipe = load_pipeline(name, seed=2)
    assert pipe.spec.is_refiner == name.endswith("refiner") and pipe.spec.vae.scaling_factor == 0.13025
    assert (pipe.text_encoder_2 is None) == pipe.spec.is_refiner
    assert PRESETS["sdxl"].force_zeros_for_empty_prompt and not PRESETS["sdxl-refiner"].force_zeros_for_empty_prompt
    image = pipe.generate(GenerationParams("a cat", steps=2, sampler="euler"))[0]
    assert image.size == (64, 64)
    # saving and loading back, both layouts: tests/test_sdxl_files.py
    assert load_pipeline(save(pipe, tmp_path / "model.safetensors")).spec == pipe.spec
