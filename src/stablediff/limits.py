"""Upper bounds on every size a file may ask for, and the checked building of configs from a file.

A config that comes from a file (the ``ModelSpec`` JSON in safetensors metadata, a diffusers or
transformers ``config.json``, a training export, the shapes of a checkpoint's tensors) is checked
here before any module is built: every field must have the right JSON type, and every size must lie
within :data:`LIMITS`. The bounds are generous, about 4x the largest real model (SDXL included:
its U-Net has 320 base channels, levels of up to 1280 channels, 10 transformer layers per block and
2048-wide contexts; its OpenCLIP bigG text tower 32 layers of width 1280), so they refuse only
values no real model has, which would otherwise make the loader loop or allocate for minutes.
``GenerationParams`` takes its bounds on image size, batch and steps from the same table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, NamedTuple, TypeVar

from stablediff.errors import BadFileError

__all__ = ["Bound", "LIMITS", "check_limits", "check_config", "config_from_dict"]

T = TypeVar("T")


class Bound(NamedTuple):
    """``lo <= value <= hi``; for a tuple field, every entry, and ``min_len <= len <= max_len``."""

    lo: float
    hi: float
    min_len: int = 0
    max_len: int = 0  # 0: not a tuple field


LIMITS: dict[str, dict[str, Bound]] = {
    "UNetConfig": {
        "in_channels": Bound(1, 64),
        "out_channels": Bound(1, 64),
        "model_channels": Bound(1, 4096),
        "channel_mult": Bound(1, 32, 1, 8),
        "num_res_blocks": Bound(1, 8),
        "attention_levels": Bound(0, 7, 0, 8),
        "num_heads": Bound(1, 128),
        "head_dim": Bound(1, 1024),
        "transformer_depth": Bound(1, 32),
        "transformer_depth_per_level": Bound(0, 32, 1, 8),  # 0 at levels without attention
        "context_dim": Bound(1, 8192),
        "norm_groups": Bound(1, 4096),
        "adm_in_channels": Bound(1, 16384),  # SDXL base: 2816 (1280 pooled + 6 x 256 micro-conditioning)
        "channels": Bound(1, 8192),  # derived: the widest level, model_channels * max(channel_mult)
    },
    "VAEConfig": {
        "in_channels": Bound(1, 64),
        "out_channels": Bound(1, 64),
        "ch": Bound(1, 4096),
        "ch_mult": Bound(1, 32, 1, 8),
        "num_res_blocks": Bound(1, 8),
        "z_channels": Bound(1, 256),
        "norm_groups": Bound(1, 4096),
        "scaling_factor": Bound(1e-6, 1e3),
        "channels": Bound(1, 8192),  # derived: ch * max(ch_mult)
    },
    "CLIPTextConfig": {
        "vocab_size": Bound(1, 1_000_000),
        "width": Bound(1, 8192),
        "layers": Bound(1, 64),
        "heads": Bound(1, 128),
        "mlp_ratio": Bound(1, 16),
        "max_positions": Bound(1, 1024),
        "layer_norm_eps": Bound(1e-12, 1.0),
        "skip_layers": Bound(0, 63),
        "projection_dim": Bound(1, 8192),  # SDXL's bigG: 1280
    },
    "ScheduleConfig": {
        "num_train_timesteps": Bound(2, 10_000),
        "beta_start": Bound(0.0, 1.0),
        "beta_end": Bound(0.0, 1.0),
        "steps_offset": Bound(0, 1000),
    },
    "ModelSpec": {"default_size": Bound(8, 8192)},
    # Not from a model file: what one generation may ask for (GenerationParams.validate).
    # 8192 pixels a side is 16x SD 1.5's 512; 64 images is 8x AUTOMATIC1111's largest batch size
    # (a CUDA run samples the whole batch at once). Steps: see below.
    "GenerationParams": {
        "width": Bound(8, 8192),
        "height": Bound(8, 8192),
        "batch_size": Bound(1, 64),
        # the samplers' maximum: SD models have 1000 trained timesteps (sampling_plan allows 1 to T)
        "steps": Bound(1, 1000),
    },
}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range_error(label: str, value: float, bound: Bound) -> str | None:
    if value > bound.hi:
        return f"{label} = {_describe(value)} is larger than any real model has (the limit is {bound.hi})"
    if value < bound.lo:
        return f"{label} = {_describe(value)} must be at least {bound.lo}"
    return None


def _label(name: str, aliases: Mapping[str, str], index: int | None = None) -> str:
    """``channel_mult[2] (from block_out_channels)``: our field, and the file's when it differs."""
    text = name if index is None else f"{name}[{index}]"
    alias = aliases.get(name)
    return f"{text} (from {alias})" if alias and alias != name else text


def _derived(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes computed from several fields, checked like fields (named in LIMITS)."""
    try:
        if kind == "UNetConfig":
            return {"channels": values["model_channels"] * max(values["channel_mult"])}
        if kind == "VAEConfig":
            return {"channels": values["ch"] * max(values["ch_mult"])}
    except (KeyError, ValueError, TypeError):  # a field missing or empty: its own check reports it
        return {}
    return {}


def check_limits(kind: str, values: Mapping[str, Any], where: str, aliases: Mapping[str, str] | None = None) -> None:
    """Raise BadFileError (``where: field = value ...``) for a value of ``values`` outside
    ``LIMITS[kind]``. ``aliases`` maps our field names to the file's, for the message."""
    table = LIMITS[kind]
    aliases = aliases or {}
    for name, value in {**values, **_derived(kind, values)}.items():
        bound = table.get(name)
        if bound is None or value is None:
            continue
        if bound.max_len:
            if not bound.min_len <= len(value) <= bound.max_len:
                raise BadFileError(
                    f"{where}: {_label(name, aliases)} has {len(value)} entries; "
                    f"it must have {bound.min_len} to {bound.max_len}"
                )
            for i, item in enumerate(value):
                problem = _range_error(_label(name, aliases, i), item, bound)
                if problem:
                    raise BadFileError(f"{where}: {problem}")
            continue
        problem = _range_error(_label(name, aliases), value, bound)
        if problem:
            raise BadFileError(f"{where}: {problem}")


def check_config(config: Any, where: str) -> Any:
    """``check_limits`` on a built config (a dataclass instance); returns it."""
    check_limits(type(config).__name__, {f.name: getattr(config, f.name) for f in fields(config)}, where)
    return config


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is not an int here


def _coerce(annotation: str, value: Any) -> tuple[bool, Any]:
    """(ok, value as the field holds it) for a JSON value and a field's annotation."""
    if annotation.endswith(" | None"):
        if value is None:
            return True, None
        annotation = annotation[: -len(" | None")]
    if annotation == "int":
        return _is_int(value), value
    if annotation == "float":  # an integer only where a float holds it exactly
        ok = (type(value) is float and math.isfinite(value)) or (_is_int(value) and abs(value) <= 2**53)
        return ok, float(value) if ok else value
    if annotation == "bool":
        return type(value) is bool, value
    if annotation == "str":
        return type(value) is str, value
    if annotation == "tuple[int, ...]":
        ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
        return ok, tuple(value) if ok else value
    raise TypeError(f"limits: no JSON check for a field annotated {annotation!r}")  # a bug: extend _coerce


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "tuple[int, ...]": "a list of integers",
}


def config_from_dict(
    cls: type[T], data: Any, where: str, aliases: Mapping[str, str] | None = None, nested: tuple[str, ...] = ()
) -> T:
    """Build the dataclass ``cls`` from a file's JSON object ``data``.

    Unknown keys, values of the wrong type (a bool is not an integer, 2.0 is not an integer) and
    sizes outside ``LIMITS`` raise BadFileError naming ``where`` and the field, before ``cls`` is
    built; missing keys take the dataclass defaults. Fields named in ``nested`` hold configs that
    the caller has already built. The constructor's own ValueError becomes a BadFileError too.
    """
    if not isinstance(data, dict):
        raise BadFileError(f"{where}: expected a JSON object, got {type(data).__name__}")
    aliases = aliases or {}
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise BadFileError(f"{where}: unknown field {_describe(unknown[0])} (known: {', '.join(known)})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in nested:
            kwargs[name] = value
            continue
        ok, kwargs[name] = _coerce(known[name].type, value)
        if not ok:
            want = _TYPE_NAMES.get(known[name].type.removesuffix(" | None"), known[name].type)
            null = " or null" if known[name].type.endswith(" | None") else ""
            raise BadFileError(
                f"{where}: {_label(name, aliases)} must be {want}{null}, "
                f"got {_describe(value)} ({type(value).__name__})"
            )
    required = [f.name for f in known.values() if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise BadFileError(f"{where}: the field {_label(missing[0], aliases)} is missing")
    if cls.__name__ in LIMITS:
        values = {f.name: f.default for f in known.values() if f.default is not MISSING and f.name not in nested}
        values.update((k, v) for k, v in kwargs.items() if k not in nested)
        check_limits(cls.__name__, values, where, aliases)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise BadFileError(f"{where}: {err}") from None
