"""Our networks against diffusers / transformers on the same random weights (fp32, atol 1e-5).

Tiny SD1-style and SD2-style models are built with the reference libraries, saved as a diffusers
folder, loaded with ours, and compared; then re-saved by us as a single-file checkpoint, which
diffusers' own single-file converters must read back to the very same weights.
"""

from __future__ import annotations

import pytest
import torch
from reference import STYLES, build_reference, save_reference_folder

from stablediff.loading import load_pipeline, save

ATOL = 1e-5


@pytest.fixture(scope="module", params=STYLES)
def reference(request, tmp_path_factory):
    parts = build_reference(request.param)
    folder = save_reference_folder(tmp_path_factory.mktemp(request.param), *parts)
    return request.param, parts, folder


def _max_diff(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (reference max |x| {a.abs().max().item():.3f})")
    return diff


@torch.no_grad()
def assert_matches_reference(parts, pipe) -> None:
    unet, vae, text, tokenizer, _ = parts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 617.5])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    assert _max_diff("unet", unet(x, t, ctx).sample, pipe.unet(x, t, ctx)) < ATOL

    scale = vae.config.scaling_factor
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    posterior = vae.encode(images).latent_dist
    ours = pipe.vae.encode(images)
    assert _max_diff("vae encode mean", posterior.mean * scale, ours.mean) < ATOL
    assert _max_diff("vae encode std", posterior.std * scale, ours.std) < ATOL
    z = torch.randn(2, 4, 4, 4, generator=g)
    assert _max_diff("vae decode", vae.decode(z / scale).sample, pipe.vae.decode(z)) < ATOL

    ids = torch.tensor(tokenizer(["a photo of an astronaut riding a horse", "", "café (red:1.2) 🐱"]))
    assert _max_diff("text encoder", text(ids).last_hidden_state, pipe.text_encoder(ids)) < ATOL


def test_diffusers_folder_matches_reference(reference):
    style, parts, folder = reference
    pipe = load_pipeline(folder)
    assert pipe.spec.prediction_type == ("v_prediction" if style == "sd2" else "epsilon")
    assert pipe.tokenizer.pad_id == (0 if style == "sd2" else 49407)
    assert_matches_reference(parts, pipe)


def test_single_file_matches_reference(reference, tmp_path):
    _, parts, folder = reference
    path = save(load_pipeline(folder), tmp_path / "model.safetensors")
    assert_matches_reference(parts, load_pipeline(path))


def test_diffusers_reads_our_single_file_layout(reference, tmp_path):
    """diffusers' own converters turn our single-file checkpoint into exactly the reference weights."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    style, (unet, vae, text, _, _), folder = reference
    ckpt = load_file(save(load_pipeline(folder), tmp_path / "model.safetensors"))

    def assert_same(expected: dict, got: dict, what: str):
        assert set(got) == set(expected), f"{what}: {sorted(set(got) ^ set(expected))[:5]}"
        for k in expected:
            assert torch.equal(got[k].reshape(expected[k].shape), expected[k]), f"{what}: {k}"

    assert_same(unet.state_dict(), sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), "unet")
    assert_same(vae.state_dict(), sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), "vae")
    if style == "sd2":
        got = sfu.convert_open_clip_checkpoint(text, ckpt)
    else:
        got = sfu.convert_ldm_clip_checkpoint(ckpt)
    got = {k.removeprefix("text_model."): v for k, v in got.items() if "position_ids" not in k}
    assert_same(text.state_dict(), got, "text encoder")


def test_diffusers_loads_our_folder(reference, tmp_path):
    """A diffusers folder we write is read by diffusers/transformers and computes the same numbers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, parts, folder = reference
    pipe = load_pipeline(folder)
    out = save(pipe, tmp_path / "ours", layout="diffusers")
    reread = (
        UNet2DConditionModel.from_pretrained(out / "unet").eval(),
        AutoencoderKL.from_pretrained(out / "vae").eval(),
        CLIPTextModel.from_pretrained(out / "text_encoder").eval(),
        parts[3],
        None,
    )
    assert_matches_reference(reread, pipe)


def test_sd2_penultimate_layer_matches_reference():
    """SD 2.x conditions on the penultimate layer of the OpenCLIP tower, then the final norm,
    as diffusers does with clip_skip=1."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablediff.weights import convert

    ref = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=48,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            hidden_act="gelu",
        )
    ).eval()
    from reference import _randomize

    _randomize(ref, 7)
    from stablediff.models.clip import CLIPTextConfig as OurConfig
    from stablediff.models.clip import CLIPTextModel as Ours

    ours = Ours(OurConfig(width=48, layers=4, heads=4, activation="gelu", skip_layers=1)).eval()
    ours.load_state_dict(convert.text_transformers_to_ours(ref.state_dict()), strict=True)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states[-2]
        expected = ref.final_layer_norm(hidden)
        assert _max_diff("sd2 penultimate", expected, ours(ids)) < ATOL
        assert _max_diff("last layer", ref(ids).last_hidden_state, ours(ids, skip_layers=0)) < ATOL


def test_inpaint_unet_matches_reference(tmp_path):
    parts = build_reference("sd1", seed=3, in_channels=9)
    pipe = load_pipeline(save_reference_folder(tmp_path / "inpaint", *parts))
    assert pipe.spec.is_inpaint
    g = torch.Generator().manual_seed(2)
    x, extra = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        ref = parts[0](torch.cat([x, extra], 1), torch.tensor([250.0]), ctx).sample
        assert _max_diff("inpaint unet", ref, pipe.unet(x, torch.tensor([250.0]), ctx, concat=extra)) < ATOL
