"""SDXL's U-Nets (base and refiner) against diffusers' UNet2DConditionModel.

Tiny random SDXL-like models are compared number for number (fp32, atol 1e-5) with the added
conditioning built by `micro_conditioning`; the full-size configs are built on the meta device on
both sides (no weights, no download) to compare parameter counts and the key mapping.
"""

from __future__ import annotations

import pytest
import torch
from reference import _randomize

from stablediff.models.unet import UNetConfig, UNetModel, micro_conditioning, sdxl_time_ids
from stablediff.presets import SDXL_REFINER_UNET, SDXL_UNET, TINY_SDXL_UNET, infer_unet_config
from stablediff.weights import convert

ATOL = 1e-5
META = torch.device("meta")

# The architecture fields of the published unet/config.json of stabilityai/stable-diffusion-xl-base-1.0
# and -refiner-1.0 (the features they switch off are listed as null, as there).
_PUBLISHED = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    norm_num_groups=32,
    upcast_attention=None,
    class_embed_type=None,
    num_class_embeds=None,
    time_cond_proj_dim=None,
    encoder_hid_dim=None,
    num_attention_heads=None,
)
SDXL_BASE_DIFFUSERS = dict(
    _PUBLISHED,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    projection_class_embeddings_input_dim=2816,
)
SDXL_REFINER_DIFFUSERS = dict(
    _PUBLISHED,
    block_out_channels=[384, 768, 1536, 1536],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4,
    attention_head_dim=[6, 12, 24, 24],
    cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,
)
FULL = {
    "base": (SDXL_UNET, SDXL_BASE_DIFFUSERS, 2_567_463_684),
    "refiner": (SDXL_REFINER_UNET, SDXL_REFINER_DIFFUSERS, 2_259_526_660),
}

# Tiny look-alikes: the base's per-level depth (middle 2, levels 1 and 2 at 1 and 2) and 6 time ids;
# the refiner's 4 levels without attention at either end, one depth, 5 time ids.
TINY_BASE = dict(
    SDXL_BASE_DIFFUSERS,
    block_out_channels=[16, 32, 64],
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[1, 2, 4],
    cross_attention_dim=64,
    projection_class_embeddings_input_dim=32 + 6 * 256,
    norm_num_groups=8,
)
TINY_REFINER = dict(
    SDXL_REFINER_DIFFUSERS,
    block_out_channels=[16, 32, 64, 64],
    transformer_layers_per_block=2,
    attention_head_dim=[1, 2, 4, 4],
    cross_attention_dim=48,
    projection_class_embeddings_input_dim=40 + 5 * 256,
    norm_num_groups=8,
)


def _diffusers(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def _ours_from(config: dict) -> UNetConfig:
    return UNetConfig.from_dict(convert.unet_config_from_diffusers(config), "test config")


def _to_ours(sd: dict, cfg: UNetConfig) -> dict:
    return convert.unet_diffusers_to_ours(sd, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels)


def _to_diffusers(sd: dict, cfg: UNetConfig) -> dict:
    return convert.unet_ours_to_diffusers(sd, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels)


def _pair(config: dict, seed: int):
    """(diffusers' model with random weights, ours with the same weights through our mapping)."""
    ref = _diffusers(config).eval()
    _randomize(ref, seed)
    cfg = _ours_from(dict(ref.config))
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(_to_ours(ref.state_dict(), cfg), strict=True)
    return ref, ours


def _max_diff(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (reference max |x| {a.abs().max().item():.3f})")
    return diff


def test_tiny_base_config_reads_as_the_tiny_preset():
    assert _ours_from(TINY_BASE) == TINY_SDXL_UNET


@torch.no_grad()
def test_tiny_base_matches_diffusers():
    ref, ours = _pair(TINY_BASE, seed=11)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 24, generator=g)
    t = torch.tensor([3.0, 617.5])
    ctx = torch.randn(2, 77, 64, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    ids = sdxl_time_ids((1024, 768), (32, 16), target_size=(1024, 1024))
    assert ids.tolist() == [1024, 768, 32, 16, 1024, 1024]
    expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(2, -1)}).sample
    got = ours(x, t, ctx, y=micro_conditioning(pooled, ids))
    assert _max_diff("tiny sdxl base", expected, got) < ATOL
    # The micro-conditioning matters: other ids give another output.
    other = micro_conditioning(pooled, sdxl_time_ids((512, 512), (0, 0), target_size=(1024, 1024)))
    assert (ours(x, t, ctx, y=other) - got).abs().max() > 1e-3


@torch.no_grad()
def test_tiny_refiner_matches_diffusers():
    ref, ours = _pair(TINY_REFINER, seed=12)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 41.0])
    ctx = torch.randn(2, 77, 48, generator=g)
    pooled = torch.randn(2, 40, generator=g)
    # A row of time ids per image: original size, crop, aesthetic score (6.0 and the negative 2.5).
    ids = torch.stack(
        [
            sdxl_time_ids((1024, 768), (32, 16), aesthetic_score=6.0),
            sdxl_time_ids((768, 1024), (0, 0), aesthetic_score=2.5),
        ]
    )
    expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    got = ours(x, t, ctx, y=micro_conditioning(pooled, ids))
    assert _max_diff("tiny sdxl refiner", expected, got) < ATOL


@pytest.mark.parametrize("config", [TINY_BASE, TINY_REFINER], ids=["base", "refiner"])
def test_diffusers_reads_our_single_file_layout(config):
    """diffusers' own LDM converter turns our names (with the single file's prefix) into exactly
    diffusers' weights; and the config we write back builds the same diffusers model."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ref, ours = _pair(config, seed=13)
    ckpt = {convert.UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    got = convert_ldm_unet_checkpoint(ckpt, dict(ref.config))
    expected = ref.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    rebuilt = _diffusers(convert.unet_config_to_diffusers(ours.config.to_dict()))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    assert _ours_from(dict(rebuilt.config)) == ours.config


@pytest.mark.parametrize("kind", sorted(FULL))
def test_full_size_config_parameters_and_key_bijection(kind):
    ours_cfg, published, count = FULL[kind]
    assert _ours_from(published) == ours_cfg
    with META:
        ref = _diffusers(published)
        ours = UNetModel(ours_cfg)
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"sdxl {kind}: {n_ours:,} parameters (diffusers {n_ref:,})")
    assert n_ours == n_ref == count

    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    to_ours = _to_ours({k: k for k in ref_shapes}, ours_cfg)  # our name -> diffusers' name
    assert len(to_ours) == len(ref_shapes)  # no two diffusers keys land on one of ours
    assert set(to_ours) == set(our_shapes)
    assert all(our_shapes[ours_key] == ref_shapes[ref_key] for ours_key, ref_key in to_ours.items())
    back = _to_diffusers({k: k for k in our_shapes}, ours_cfg)  # diffusers' name -> ours
    assert back == {ref_key: ours_key for ours_key, ref_key in to_ours.items()}

    # A single file's U-Net (the original names under model.diffusion_model.) is recognised by its shapes.
    single_file = {convert.UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    assert infer_unet_config(convert.split_single_file(single_file)["unet"]) == ours_cfg


def test_sd_configs_read_as_before():
    """SD 1.x / 2.x diffusers configs get no per-level depth and no added conditioning, and write
    back the same diffusers fields."""
    sd15 = convert.unet_config_from_diffusers({})
    assert sd15["transformer_depth"] == 1 and sd15["transformer_depth_per_level"] is None
    assert sd15["adm_in_channels"] is None
    assert UNetConfig.from_dict(sd15) == UNetConfig()
    written = convert.unet_config_to_diffusers(UNetConfig().to_dict())
    assert written["transformer_layers_per_block"] == 1 and "addition_embed_type" not in written
    # A stored spec written before the new fields loads unchanged.
    old = {
        k: v for k, v in UNetConfig().to_dict().items() if k not in ("transformer_depth_per_level", "adm_in_channels")
    }
    assert UNetConfig.from_dict(old) == UNetConfig()


def test_missing_or_unexpected_y_is_named():
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10.0])
    sdxl = UNetModel(TINY_SDXL_UNET).eval()
    with pytest.raises(ValueError, match=r"adm_in_channels=1568, SDXL-style\) needs y \[B, 1568\]"):
        sdxl(x, t, torch.randn(1, 5, 64, generator=g))
    with pytest.raises(ValueError, match=r"y must be \[B, 1568\] \(adm_in_channels\), got \(1, 32\)"):
        sdxl(x, t, torch.randn(1, 5, 64, generator=g), y=torch.randn(1, 32))
    sd = UNetModel(
        UNetConfig(model_channels=16, channel_mult=(1, 2), attention_levels=(1,), num_heads=2, norm_groups=8)
    )
    with pytest.raises(ValueError, match=r"y was given, but this U-Net has no added conditioning"):
        sd(x, t, torch.randn(1, 5, 768, generator=g), y=torch.randn(1, 32))


def test_unsupported_configs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"addition_embed_type 'text_image' is not supported"):
        convert.unet_config_from_diffusers(dict(TINY_BASE, addition_embed_type="text_image"))
    with pytest.raises(ValueError, match=r"addition_time_embed_dim 128 is not supported \(only SDXL's 256\)"):
        convert.unet_config_from_diffusers(dict(TINY_BASE, addition_time_embed_dim=128))
    with pytest.raises(ValueError, match=r"time_cond_proj_dim 256 is not supported"):
        convert.unet_config_from_diffusers(dict(TINY_BASE, time_cond_proj_dim=256))
    with pytest.raises(ValueError, match=r"transformer_layers_per_block has 2 entries for 3"):
        convert.unet_config_from_diffusers(dict(TINY_BASE, transformer_layers_per_block=[1, 2]))
    with pytest.raises(ValueError, match=r"a depth per transformer block"):
        convert.unet_config_from_diffusers(dict(TINY_BASE, transformer_layers_per_block=[[1, 1], [1, 2], [2, 2]]))


def test_per_level_depth_has_one_spelling():
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"repeats transformer_depth 2 at every attention level: leave it None"):
        replace(TINY_SDXL_UNET, transformer_depth_per_level=(0, 2, 2))
    with pytest.raises(ValueError, match=r"transformer_depth_per_level\[0\] is 1, but level 0 has no attention"):
        replace(TINY_SDXL_UNET, transformer_depth_per_level=(1, 1, 2))
    with pytest.raises(ValueError, match=r"has 2 entries for 3 levels"):
        replace(TINY_SDXL_UNET, transformer_depth_per_level=(0, 1))
    assert [TINY_SDXL_UNET.depth_at(level) for level in range(3)] == [0, 1, 2]
    assert [SDXL_UNET.depth_at(level) for level in range(3)] == [0, 2, 10]
    assert [SDXL_REFINER_UNET.depth_at(level) for level in range(4)] == [0, 4, 4, 0]
