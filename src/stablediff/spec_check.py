"""The checks a model spec stored in a file passes before it is trusted.

Files we write carry their `ModelSpec` as JSON in the safetensors metadata (`SPEC_METADATA_KEY`)
and its SHA-256 beside it (`SPEC_CHECKSUM_KEY`): facts no tensor shows (scaling factor, betas,
heads, prediction type) cannot be checked against the weights, so the file says what its spec was.
The shape fields are compared with what the weights (or a diffusers folder's configs) imply, and
values no real model has are refused. Files written before the checksum load as before.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

from stablediff.models.clip import CLIPTextConfig
from stablediff.presets import ModelSpec, infer_text_config, infer_unet_config, infer_vae_config
from stablediff.weights.convert import PROJECTION_KEY
from stablediff.weights.io import CheckpointError

SPEC_METADATA_KEY = "stablediff.spec"
# The SHA-256 of the spec text: facts no tensor shows (scaling factor, betas, heads, prediction
# type) cannot be checked against the weights, so a file we wrote says what its spec was.
SPEC_CHECKSUM_KEY = "stablediff.spec_sha256"

# The fields of each network's config that its weights' shapes determine (presets.infer_*).
_INFERRED_FIELDS = {
    "unet": (
        "in_channels",
        "out_channels",
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_levels",
        "transformer_depth",
        "transformer_depth_per_level",
        "context_dim",
        "use_linear_proj",
        "adm_in_channels",
    ),
    "vae": ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels"),
    "text": ("vocab_size", "width", "layers", "mlp_ratio", "max_positions", "projection_dim"),
}


def stored_spec(metadata: dict[str, str], path: Path) -> ModelSpec | None:
    """The ModelSpec a file we wrote carries in its metadata (None if it has none), after checking
    it against its own checksum (files written before the checksum have none) and for values no
    real model has."""
    stored = metadata.get(SPEC_METADATA_KEY)
    checksum = metadata.get(SPEC_CHECKSUM_KEY)
    if not stored:
        if checksum is not None:
            raise CheckpointError(
                f"{path}: has a {SPEC_CHECKSUM_KEY} but no {SPEC_METADATA_KEY}: its metadata was modified"
            )
        return None
    if checksum is not None and checksum != spec_checksum(stored):
        raise CheckpointError(
            f"{path}: spec metadata was modified: {SPEC_METADATA_KEY} does not match its {SPEC_CHECKSUM_KEY} "
            f"(stored {checksum[:16]!r}..., the text hashes to {spec_checksum(stored)[:16]!r}...)"
        )
    try:
        spec = ModelSpec.from_json(stored)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path}: the stored model spec ({SPEC_METADATA_KEY}) is invalid: {err}") from None
    check_values(spec, path)
    return spec


def spec_checksum(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_values(spec: ModelSpec, source: object) -> None:
    """Refuse a scaling factor or betas that no real model has (they would sample garbage)."""
    scale = spec.vae.scaling_factor
    if not _is_number(scale) or scale <= 0:
        raise CheckpointError(f"{source}: VAE scaling_factor must be a finite number > 0, got {scale!r}")
    sched = spec.schedule
    if sched.beta_schedule in ("linear", "scaled_linear"):  # squaredcos_cap_v2 does not use them
        start, end = sched.beta_start, sched.beta_end
        if not (_is_number(start) and _is_number(end) and 0 < start < end < 1):
            raise CheckpointError(
                f"{source}: the noise schedule needs 0 < beta_start < beta_end < 1, "
                f"got beta_start {start!r}, beta_end {end!r}"
            )


def check_fields(
    stored: object, found: object, network: str, source: object, seen_in: str, field: str | None = None
) -> None:
    """Every shape-determined field of ``stored`` (a network config of kind ``network``: unet, vae,
    text) equals ``found``; ``field`` is the spec's name for it in messages (default ``network``)."""
    for name in _INFERRED_FIELDS[network]:
        a, b = getattr(stored, name), getattr(found, name)
        if a != b:
            raise CheckpointError(
                f"{source}: the stored model spec does not match the model: {field or network}.{name} is {a!r} "
                f"in the spec but {b!r} in {seen_in}"
            )


def check_against_weights(spec: ModelSpec, sds: dict, source: object) -> None:
    """A stored spec agrees with what its weights' shapes say, field by field.

    Inference is heuristic (presets.infer_*); where it cannot read a layout, nothing is compared
    here and strict loading still checks every key and shape against the spec.
    """
    inferers = {
        "unet": ("unet", lambda sd: infer_unet_config(sd, like=spec.unet)),
        "vae": ("vae", lambda sd: infer_vae_config(sd, like=spec.vae)),
        "text": ("text", lambda sd: infer_text_tower(sd, spec.text_format)),
        # SDXL base's second tower is OpenCLIP bigG in every layout
        "text_2": ("text", lambda sd: infer_text_tower(sd, "openclip")),
    }
    for network, (kind, infer) in inferers.items():
        config = getattr(spec, network)
        if config is None or not sds.get(network):
            continue  # strict loading names the missing keys (or the unexpected tower)
        try:
            found = infer(sds[network])
        except (ValueError, KeyError, IndexError, StopIteration, ZeroDivisionError, TypeError):
            continue
        check_fields(config, found, kind, source, "the weights", network)


def infer_text_tower(sd: dict, text_format: str) -> CLIPTextConfig:
    """presets.infer_text_config, with the width of a `text_projection` when the tower has one."""
    config = infer_text_config(sd, text_format)
    projection = sd.get(PROJECTION_KEY)
    return config if projection is None else replace(config, projection_dim=int(projection.shape[0]))
