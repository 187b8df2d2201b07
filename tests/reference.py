"""Tiny random-weight reference models built with diffusers / transformers, in an SD1-style and an
SD2-style configuration, and written to disk as a diffusers folder. Shared by the parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stablediff.tokenizer import CLIPTokenizer

STYLES = ("sd1", "sd2")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (diffusers zero-initialises nothing, but we want every weight
    to matter: a mis-mapped key must change the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(noise * 0.05)
            else:
                p.copy_(1.0 + noise * 0.1)


def build_reference(style: str, seed: int = 0, in_channels: int = 4):
    """(unet, vae, text_encoder, tokenizer, scheduler) from diffusers/transformers, random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = style == "sd2"
    width = 48 if sd2 else 32
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    ).eval()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=width * 4,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            pad_token_id=0 if sd2 else 49407,
        )
    ).eval()
    for i, m in enumerate((unet, vae, text)):
        _randomize(m, seed * 10 + i)
    tokenizer = CLIPTokenizer.default(pad_token="!" if sd2 else "<|endoftext|>")
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction" if sd2 else "epsilon",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return unet, vae, text, tokenizer, scheduler


def save_reference_folder(folder: Path, unet, vae, text, tokenizer, scheduler) -> Path:
    """A diffusers model folder written by diffusers/transformers themselves."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tokenizer.save(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline" if unet.config.in_channels == 4 else "StableDiffusionInpaintPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
