"""Original single-file checkpoints in and out: SD 1.x / 2.x and SDXL base and refiner.

Reading gives the weights in our names (the file's own tensors, renamed and split without a copy,
so a load holds one copy of the weights) and the spec: the one our own files store, checked
against the weights, or the one the tensors' shapes show. Which family a file is comes from its
keys: `cond_stage_model.` (SD 1.x / 2.x), SDXL base's two towers under `conditioner.embedders.0/1`,
the refiner's bigG alone as embedder 0 (weights.convert.ldm). Writing lays out Stability's keys.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from stablediff.limits import check_config
from stablediff.presets import PRESETS, ModelSpec, infer_unet_config, infer_vae_config, spec_from_parts
from stablediff.spec_check import check_against_weights, infer_text_tower, stored_spec
from stablediff.weights import convert
from stablediff.weights.io import CheckpointError, read_metadata, read_state_dict

# The U-Net key that marks SDXL's added conditioning (pooled text + micro-conditioning).
_SDXL_UNET_KEY = "label_emb.0.0.weight"
_FAMILIES = {"sd": "an SD 1.x/2.x", "sdxl": "an SDXL base", "sdxl-refiner": "an SDXL refiner"}


def read_single_file(
    path: Path, use_ema: bool, spec: ModelSpec | None
) -> tuple[ModelSpec, dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """(spec, our-named weights {"unet", "vae", "text", and "text_2" for SDXL base}, the file's
    metadata). ``spec`` given is used as it is (strict loading then checks every key)."""
    state_dict = read_state_dict(path)
    parts = convert.split_single_file(state_dict, use_ema=use_ema)
    del state_dict  # the parts now hold the only references to the tensors
    if not parts["unet"] and not parts["vae"]:
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: no keys start with {convert.UNET_PREFIX!r} "
            f"or {convert.VAE_PREFIX!r} (first keys: {parts['unknown'][:3]})"
        )
    metadata = read_metadata(path)
    if spec is None:
        spec = stored_spec(metadata, path)
        if spec is not None:
            _check_stored(spec, parts, path)
        else:
            spec = spec_from_split(parts, "epsilon")
    sds = {name: parts[name] for name in ("unet", "vae", "text")}
    if parts["text_2"]:
        sds["text_2"] = parts["text_2"]
    return spec, sds, metadata


def _family(spec: ModelSpec) -> str:
    return "sdxl-refiner" if spec.is_refiner else "sdxl" if spec.is_sdxl else "sd"


def _check_stored(spec: ModelSpec, parts: dict, path: Path) -> None:
    """A spec our file stores describes its weights: the same family, text format and shapes."""
    if _family(spec) != parts["layout"]:
        raise CheckpointError(
            f"{path}: the stored model spec is {_FAMILIES[_family(spec)]} model but the weights are in "
            f"{_FAMILIES[parts['layout']]} checkpoint's layout"
        )
    if parts["text"] and spec.text_format != parts["text_format"]:
        raise CheckpointError(
            f"{path}: the stored model spec says text_format {spec.text_format!r} but the text encoder's "
            f"keys are in the {parts['text_format']!r} format"
        )
    check_against_weights(spec, parts, path)


def spec_from_split(parts: dict, prediction_type: str = "epsilon") -> ModelSpec:
    """The spec a foreign file's parts (``convert.split_single_file``) show: SD 1.x / 2.x as
    presets.spec_from_parts recognises them, SDXL base or refiner from the shapes with the facts no
    tensor shows (heads 64 wide, the latent scale 0.13025, Euler's "leading" spacing, 1024 px)
    taken from the `sdxl` / `sdxl-refiner` presets. A missing tower or a U-Net of the other family
    is a ValueError naming what is missing."""
    has_added_conditioning = _SDXL_UNET_KEY in parts["unet"]
    if parts["layout"] == "sd":
        if has_added_conditioning:
            raise ValueError(
                f"an SDXL U-Net ({_SDXL_UNET_KEY!r}, SDXL's added conditioning) without SDXL's text encoders: "
                f"no keys start with {convert.SDXL_CONDITIONER + 'embedders.'!r}"
            )
        return spec_from_parts(parts["unet"], parts["vae"], parts["text"], parts["text_format"], prediction_type)
    refiner = parts["layout"] == "sdxl-refiner"
    # the towers in the file's order, bigG last: (our name, the file's prefix)
    towers = [("text", convert.SDXL_REFINER_TEXT_PREFIX)]
    if not refiner:
        towers = [("text", convert.SDXL_TEXT_PREFIX), ("text_2", convert.SDXL_TEXT_2_PREFIX)]
    for name, prefix in towers:
        if not parts[name]:
            raise ValueError(f"{_FAMILIES[parts['layout']]} checkpoint without its text encoder {prefix!r}")
    bigg, prefix = towers[-1]
    if convert.PROJECTION_KEY not in parts[bigg]:
        raise ValueError(f"SDXL's OpenCLIP ViT-bigG tower has no {prefix + 'text_projection'!r}")
    if not has_added_conditioning:
        raise ValueError(
            f"SDXL text encoders but the U-Net has no {_SDXL_UNET_KEY!r} (SDXL's added conditioning): "
            "not an SDXL checkpoint"
        )
    preset = PRESETS["sdxl-refiner" if refiner else "sdxl"]
    # SDXL reads both towers at the penultimate layer, without the final layer norm.
    sdxl = lambda cfg: replace(cfg, skip_layers=1, context_norm=False)  # noqa: E731
    if refiner:
        text, text_2 = sdxl(infer_text_tower(parts["text"], "openclip")), None
    else:
        text = sdxl(infer_text_tower(parts["text"], "openai"))
        text_2 = check_config(sdxl(infer_text_tower(parts["text_2"], "openclip")), "text-encoder 2 weights")
    unet = check_config(infer_unet_config(parts["unet"]), "U-Net weights")
    vae = check_config(infer_vae_config(parts["vae"], like=preset.vae), "VAE weights")
    inpaint = unet.in_channels == 2 * vae.z_channels + 1
    return replace(
        preset,
        name=preset.name + ("-inpaint" if inpaint else ""),
        unet=unet,
        vae=vae,
        text=check_config(text, "text-encoder weights"),
        text_2=text_2,
        prediction_type=prediction_type,
    )


def join_single_file(spec: ModelSpec, sds: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Our-named weights (``pipe.state_dicts()``) -> the original layout of ``spec``'s family: the
    keys of Stability's SDXL base / refiner files, or SD 1.x / 2.x's."""
    if spec.is_sdxl:
        return convert.join_sdxl_single_file(sds["unet"], sds["vae"], sds["text"], sds.get("text_2"))
    return convert.join_single_file(sds["unet"], sds["vae"], sds["text"], spec.text_format)
