"""The original single-file (LDM / sgm) layout: one state dict with a prefix per network.

SD 1.x / 2.x files hold `model.diffusion_model.` (U-Net), `first_stage_model.` (VAE) and
`cond_stage_model.` (CLIP in transformers' names, or OpenCLIP's). SDXL's files (Stability's
generative-models) keep the U-Net and VAE prefixes and put the text towers under its
`conditioner.embedders.N.`: the base CLIP ViT-L (transformers' names) and OpenCLIP ViT-bigG, the
refiner bigG alone. Our module names are the LDM ones, so this layout is mostly prefixes; OpenCLIP's
fused `in_proj` is split into q, k, v.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPENAI_TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
OPENCLIP_TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

# Keys of a single-file checkpoint that are not weights of the three networks: schedule buffers,
# the training-time VAE loss, OpenCLIP's projection heads and bookkeeping.
SINGLE_FILE_IGNORED_PREFIXES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_",
    "log_one_minus",
    "posterior_",
    "logvar",
    "model_ema.",
    "first_stage_model.loss.",
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.visual.",
    "lvlb_weights",
    "denoiser.",  # sgm's denoiser buffers (sigmas), found in some SDXL files
)

# SDXL's conditioner: the base holds CLIP ViT-L (transformers' names) then OpenCLIP ViT-bigG; the
# refiner holds bigG alone, as its embedder 0.
SDXL_CONDITIONER = "conditioner."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."
# diffusers' conversion script copies transformers' names as they are, without `text_model.` since
# transformers 5 saves CLIPTextModel flat.
_SDXL_TEXT_PREFIXES = (SDXL_TEXT_PREFIX, "conditioner.embedders.0.transformer.")
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."
# What layout a single file is in (split_single_file's "layout").
SINGLE_FILE_LAYOUTS = ("sd", "sdxl", "sdxl-refiner")
# Buffers Stability's SDXL files carry that no network of ours holds: CLIP-L's position ids and
# bigG's contrastive temperature. Read and dropped; written back so the keys are Stability's.
_POSITION_IDS = "embeddings.position_ids"
_LOGIT_SCALE = "logit_scale"
# OpenCLIP's trained temperature is clamped at 100 (Radford et al. 2021): ln(100), as the files hold.
_LOGIT_SCALE_VALUE = math.log(100.0)


def _take_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _has_prefix(sd: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def single_file_layout(sd: dict) -> str:
    """ "sdxl" (SDXL base's two towers under `conditioner.`), "sdxl-refiner" (bigG alone as embedder
    0) or "sd" (SD 1.x / 2.x, `cond_stage_model.`, or no text tower at all). A conditioner that is
    neither, such as bigG as embedder 0 beside an embedder 1, is a ValueError naming its prefixes."""
    if not _has_prefix(sd, SDXL_CONDITIONER):
        return "sd"
    base = _has_prefix(sd, _SDXL_TEXT_PREFIXES[1]) or _has_prefix(sd, SDXL_TEXT_2_PREFIX)
    refiner = _has_prefix(sd, SDXL_REFINER_TEXT_PREFIX)
    if base != refiner:
        return "sdxl" if base else "sdxl-refiner"
    found = sorted({".".join(k.split(".")[:4]) for k in sd if k.startswith(SDXL_CONDITIONER)})[:4]
    raise ValueError(
        f"an SDXL conditioner of unknown layout (found {found}): the base has "
        f"{SDXL_TEXT_PREFIX!r} and {SDXL_TEXT_2_PREFIX!r}, the refiner {SDXL_REFINER_TEXT_PREFIX!r} alone"
    )


def split_single_file(sd: dict[str, torch.Tensor], use_ema: bool = True) -> dict:
    """Split an original single-file checkpoint into our state dicts.

    Returns {"unet", "vae", "text", "text_2", "text_format" ("openai" | "openclip"), "layout" (one of
    SINGLE_FILE_LAYOUTS), "ema_used", "unknown"}: "text" is the first text tower (SDXL base: CLIP-L; the
    refiner: bigG), "text_2" SDXL base's bigG ({} otherwise), "unknown" the keys that belong to none
    of the networks (for a strict error). The tensors are the file's own, renamed (OpenCLIP's fused
    attention split into views), so nothing is copied.
    """
    unet = _take_prefix(sd, UNET_PREFIX)
    ema_used = False
    if use_ema and any(k.startswith(EMA_PREFIX) for k in sd):
        ema = extract_ema(sd, unet.keys())
        if ema is not None:
            unet, ema_used = ema, True
    vae = {k: v for k, v in _take_prefix(sd, VAE_PREFIX).items() if not k.startswith("loss.")}
    layout = single_file_layout(sd)
    text_2 = {}
    if layout == "sdxl":
        text_format = "openai"
        text, text_2 = sdxl_text_from_single_file(sd)
    elif layout == "sdxl-refiner":
        text_format = "openclip"
        text = openclip_to_ours(_take_prefix(sd, SDXL_REFINER_TEXT_PREFIX), keep_projection=True)
    elif any(k.startswith(OPENCLIP_TEXT_PREFIX) for k in sd):
        text_format = "openclip"
        text = openclip_to_ours(_take_prefix(sd, OPENCLIP_TEXT_PREFIX))
    else:
        text_format = "openai"
        prefix = next((p for p in OPENAI_TEXT_PREFIXES if any(k.startswith(p + "embeddings.") for k in sd)), None)
        text = _take_prefix(sd, prefix) if prefix else {}
        text.pop(_POSITION_IDS, None)
    known = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", SDXL_CONDITIONER, *SINGLE_FILE_IGNORED_PREFIXES)
    unknown = [k for k in sd if not k.startswith(known)]
    return {
        "unet": unet,
        "vae": vae,
        "text": text,
        "text_2": text_2,
        "text_format": text_format,
        "layout": layout,
        "ema_used": ema_used,
        "unknown": unknown,
    }


def extract_ema(sd: dict[str, torch.Tensor], unet_keys: Iterable[str]) -> dict[str, torch.Tensor] | None:
    """The EMA copy of the U-Net: LDM stores it under `model_ema.` with the dots of
    `diffusion_model.<key>` removed. None when the copy is incomplete."""
    out = {}
    for key in unet_keys:
        ema_key = EMA_PREFIX + ("diffusion_model." + key).replace(".", "")
        if ema_key not in sd:
            return None
        out[key] = sd[ema_key]
    return out


def join_single_file(unet: dict, vae: dict, text: dict, text_format: str) -> dict[str, torch.Tensor]:
    """Our three state dicts (SD 1.x / 2.x) -> one original-layout state dict."""
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    if text_format == "openclip":
        out.update({OPENCLIP_TEXT_PREFIX + k: v for k, v in ours_to_openclip(text).items()})
    else:
        out.update({OPENAI_TEXT_PREFIXES[0] + k: v for k, v in text.items()})
    return out


def join_sdxl_single_file(unet: dict, vae: dict, text: dict, text_2: dict | None) -> dict[str, torch.Tensor]:
    """SDXL's networks in our names -> the keys of Stability's sd_xl_base_1.0.safetensors (``text``
    CLIP-L, ``text_2`` bigG) or, with ``text_2`` None, sd_xl_refiner_1.0.safetensors (``text`` bigG),
    with the two buffers those files carry: CLIP-L's `position_ids` (int64) and bigG's `logit_scale`
    (in the bigG weights' dtype)."""
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    if text_2 is None:
        bigg, prefix = text, SDXL_REFINER_TEXT_PREFIX
        out.update({prefix + k: v for k, v in ours_to_openclip(text).items()})
    else:
        bigg, prefix = text_2, SDXL_TEXT_2_PREFIX
        out.update(sdxl_text_to_single_file(text, text_2))
        positions = text["embeddings.position_embedding.weight"].shape[0]
        out[SDXL_TEXT_PREFIX + _POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]
    dtype = bigg["embeddings.token_embedding.weight"].dtype
    out[prefix + _LOGIT_SCALE] = torch.tensor(_LOGIT_SCALE_VALUE, dtype=dtype)
    return out


# OpenCLIP text tower <-> transformers CLIP names (ours). Fused in_proj is split into q, k, v.
_OPENCLIP_RENAMES = [
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.", "final_layer_norm."),
    ("transformer.resblocks.", "encoder.layers."),
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".attn.out_proj.", ".self_attn.out_proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
]
_OPENCLIP_DROPPED = ("text_projection", "logit_scale", "visual.", "attn_mask")
# OpenCLIP applies its projection as `pooled @ text_projection` ([width, dim]); transformers and we
# hold it as a bias-free Linear's weight ([dim, width]): the same matrix transposed.
_OPENCLIP_PROJECTION = "text_projection"
PROJECTION_KEY = "text_projection.weight"


def openclip_to_ours(sd: dict[str, torch.Tensor], keep_projection: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower in our names; its `text_projection` is kept (transposed) only with
    ``keep_projection`` (SDXL's bigG uses it; SD 2.x does not). Older versions of diffusers'
    convert_diffusers_to_original_sdxl.py wrote the projection as transformers holds it,
    `text_projection.weight`: that one is taken as it is. A fused `in_proj` whose rows are not
    three equal parts, or a projection that is not a matrix, is a ValueError naming the key."""
    out = {}
    for key, value in sd.items():
        if keep_projection and key in (_OPENCLIP_PROJECTION, PROJECTION_KEY):
            if value.ndim != 2:
                raise ValueError(f"{key!r} has shape {tuple(value.shape)}: a text projection is a matrix")
            if PROJECTION_KEY in out:
                raise ValueError(f"both {_OPENCLIP_PROJECTION!r} and {PROJECTION_KEY!r}: two text projections")
            out[PROJECTION_KEY] = value.t().contiguous() if key == _OPENCLIP_PROJECTION else value
            continue
        if key.startswith(_OPENCLIP_DROPPED):
            continue
        if ".attn.in_proj_" in key:
            if value.ndim == 0 or value.shape[0] % 3:
                raise ValueError(f"{key!r} has shape {tuple(value.shape)}: a fused q/k/v projection has 3 x width rows")
            base, kind = key.split(".attn.in_proj_")  # kind: "weight" | "bias"
            base = _rename(base + ".", _OPENCLIP_RENAMES)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{name}.{kind}"] = part
            continue
        out[_rename(key, _OPENCLIP_RENAMES)] = value
    return out


def ours_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reverse = [(b, a) for a, b in _OPENCLIP_RENAMES]
    out = {}
    for key, value in sd.items():
        if ".self_attn.q_proj." in key:
            base, kind = key.split(".self_attn.q_proj.")
            parts = [sd[f"{base}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
            out[_rename(base + ".", reverse) + "attn.in_proj_" + kind] = torch.cat(parts, dim=0)
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        elif key == PROJECTION_KEY:
            out[_OPENCLIP_PROJECTION] = value.t().contiguous()
        else:
            out[_rename(key, reverse)] = value
    return out


def sdxl_text_from_single_file(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(text, text_2): SDXL base's two text towers in our names, from its single file's keys."""
    prefix = next((p for p in _SDXL_TEXT_PREFIXES if _has_prefix(sd, p + "embeddings.")), SDXL_TEXT_PREFIX)
    text = _take_prefix(sd, prefix)
    text.pop(_POSITION_IDS, None)
    return text, openclip_to_ours(_take_prefix(sd, SDXL_TEXT_2_PREFIX), keep_projection=True)


def sdxl_text_to_single_file(text: dict[str, torch.Tensor], text_2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``sdxl_text_from_single_file`` (the weights only; ``join_sdxl_single_file`` adds
    the buffers)."""
    out = {SDXL_TEXT_PREFIX + k: v for k, v in text.items()}
    out.update({SDXL_TEXT_2_PREFIX + k: v for k, v in ours_to_openclip(text_2).items()})
    return out


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if old in key:
            key = key.replace(old, new)
    return key
