"""diffusers' and transformers' config.json <-> our config fields (plain dicts: no model import).

The configs are strangers' JSON: every value read is type-checked here (ValueError naming the
key); the sizes are then checked against limits.LIMITS by the caller, which names the file.
"""

from __future__ import annotations

# SDXL's micro-conditioning: each number is embedded 256 wide (diffusers' addition_time_embed_dim;
# the same constant as models.unet.MICRO_CONDITIONING_DIM, which this module may not import).
MICRO_CONDITIONING_DIM = 256

# Our config fields -> the config.json keys they come from, for error messages.
UNET_DIFFUSERS_KEYS = {
    "model_channels": "block_out_channels",
    "channel_mult": "block_out_channels",
    "channels": "block_out_channels",
    "num_res_blocks": "layers_per_block",
    "attention_levels": "down_block_types",
    "num_heads": "attention_head_dim",
    "head_dim": "attention_head_dim",
    "transformer_depth": "transformer_layers_per_block",
    "transformer_depth_per_level": "transformer_layers_per_block",
    "context_dim": "cross_attention_dim",
    "adm_in_channels": "projection_class_embeddings_input_dim",
    "use_linear_proj": "use_linear_projection",
    "norm_groups": "norm_num_groups",
}
VAE_DIFFUSERS_KEYS = {
    "ch": "block_out_channels",
    "ch_mult": "block_out_channels",
    "channels": "block_out_channels",
    "num_res_blocks": "layers_per_block",
    "z_channels": "latent_channels",
    "norm_groups": "norm_num_groups",
}
TEXT_TRANSFORMERS_KEYS = {
    "width": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "mlp_ratio": "intermediate_size",
    "max_positions": "max_position_embeddings",
    "activation": "hidden_act",
}


def _get(c: dict, key: str, default, kind: str):
    """``c[key]`` (or ``default``) checked to be of ``kind``: "int" (>= 1), "ints" (a non-empty list
    of ints >= 1), "strs", "str", "flag" (true, false or null), "number"."""
    value = c.get(key, default)
    if kind == "int":
        ok = type(value) is int and value >= 1
    elif kind == "ints":
        ok = isinstance(value, (list, tuple)) and value and all(type(v) is int and v >= 1 for v in value)
    elif kind == "strs":
        ok = isinstance(value, (list, tuple)) and all(type(v) is str for v in value)
    elif kind == "str":
        ok = type(value) is str
    elif kind == "flag":
        ok = value is None or type(value) is bool
    elif kind == "number":
        ok = type(value) in (int, float)
    else:
        raise TypeError(f"unknown kind {kind!r}")
    if not ok:
        want = {
            "int": "an integer >= 1",
            "ints": "a non-empty list of integers >= 1",
            "strs": "a list of strings",
            "str": "a string",
            "flag": "true or false",
            "number": "a number",
        }[kind]
        raise ValueError(f"{key} must be {want}, got {value!r:.60}")
    return bool(value) if kind == "flag" else value


def unet_config_from_diffusers(c: dict) -> dict:
    if not isinstance(c, dict):
        raise ValueError(f"a U-Net config must be a JSON object, got {type(c).__name__}")
    for key in _UNET_UNSUPPORTED:
        if c.get(key) is not None:
            raise ValueError(f"{key} {c[key]!r:.60} is not supported (a U-Net feature we do not build)")
    blocks = list(_get(c, "block_out_channels", (320, 640, 1280, 1280), "ints"))
    mc = blocks[0]
    if any(b % mc for b in blocks):
        raise ValueError(f"block_out_channels {blocks} are not multiples of the first")
    down = _get(c, "down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "strs")
    if len(down) != len(blocks):
        raise ValueError(f"{len(down)} down_block_types for {len(blocks)} block_out_channels")
    layers = c.get("layers_per_block", 2)
    if isinstance(layers, list):
        raise ValueError(f"per-level layers_per_block {layers!r:.60} is not supported")
    layers = _get(c, "layers_per_block", 2, "int")
    # diffusers' `attention_head_dim` is, despite its name, the number of heads (a known misnomer);
    # `num_attention_heads` takes precedence when set.
    key = "num_attention_heads" if c.get("num_attention_heads") else "attention_head_dim"
    heads = _get(c, key, 8, "ints" if isinstance(c.get(key), (list, tuple)) else "int")
    if isinstance(heads, int):
        heads_fields = {"num_heads": heads, "head_dim": None}
    else:
        if len(heads) != len(blocks):
            raise ValueError(f"{key} has {len(heads)} entries for {len(blocks)} block_out_channels")
        widths = {b // h for b, h in zip(blocks, heads, strict=True)}
        same_heads = len(set(heads)) == 1
        if same_heads:
            heads_fields = {"num_heads": heads[0], "head_dim": None}
        elif len(widths) == 1:
            heads_fields = {"num_heads": None, "head_dim": widths.pop()}
        else:
            raise ValueError(f"attention_head_dim {heads} is neither constant heads nor constant head width")
    attention = tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn"))
    return {
        "in_channels": _get(c, "in_channels", 4, "int"),
        "out_channels": _get(c, "out_channels", 4, "int"),
        "model_channels": mc,
        "channel_mult": tuple(b // mc for b in blocks),
        "num_res_blocks": layers,
        "attention_levels": attention,
        **heads_fields,
        **_transformer_depths(c, len(blocks), attention),
        "context_dim": _get(c, "cross_attention_dim", 768, "int"),
        "use_linear_proj": _get(c, "use_linear_projection", False, "flag"),
        "upcast_attention": _get(c, "upcast_attention", False, "flag"),
        "norm_groups": _get(c, "norm_num_groups", 32, "int"),
        "adm_in_channels": _added_conditioning(c),
    }


# diffusers U-Net features with weights or inputs our U-Net does not have: a config that sets one
# is refused by name rather than failing later on unknown weights.
_UNET_UNSUPPORTED = (
    "class_embed_type",
    "num_class_embeds",
    "time_cond_proj_dim",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "reverse_transformer_layers_per_block",
)


def _transformer_depths(c: dict, levels: int, attention: tuple[int, ...]) -> dict:
    """transformer_depth (the middle block's: diffusers gives it the last level's entry) and
    transformer_depth_per_level (None unless the attention levels differ from it)."""
    key = "transformer_layers_per_block"
    depth = c.get(key, 1)
    if not isinstance(depth, (list, tuple)):
        return {"transformer_depth": _get(c, key, 1, "int"), "transformer_depth_per_level": None}
    if any(isinstance(d, (list, tuple)) for d in depth):
        raise ValueError(f"{key} with a depth per transformer block {depth!r:.60} is not supported")
    depth = _get(c, key, 1, "ints")
    if len(depth) != levels:
        raise ValueError(f"{key} has {len(depth)} entries for {levels} block_out_channels")
    middle = depth[-1]
    per_level = tuple(depth[i] if i in attention else 0 for i in range(levels))
    same = all(per_level[i] == middle for i in attention)
    return {"transformer_depth": middle, "transformer_depth_per_level": None if same else per_level}


def _added_conditioning(c: dict) -> int | None:
    """adm_in_channels: SDXL's `text_time` embedding (pooled text + 256-wide time ids), or None."""
    kind = c.get("addition_embed_type")
    if kind is None:
        return None
    if kind != "text_time":
        raise ValueError(f"addition_embed_type {kind!r:.60} is not supported (only SDXL's 'text_time')")
    time_dim = _get(c, "addition_time_embed_dim", None, "int")
    if time_dim != MICRO_CONDITIONING_DIM:
        raise ValueError(f"addition_time_embed_dim {time_dim} is not supported (only SDXL's {MICRO_CONDITIONING_DIM})")
    return _get(c, "projection_class_embeddings_input_dim", None, "int")


def unet_config_to_diffusers(u: dict) -> dict:
    mc, mult, att = u["model_channels"], u["channel_mult"], set(u["attention_levels"])
    blocks = [mc * m for m in mult]
    heads = [u["num_heads"] or b // u["head_dim"] for b in blocks]
    out = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": u["in_channels"],
        "out_channels": u["out_channels"],
        "block_out_channels": blocks,
        "layers_per_block": u["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if i in att else "DownBlock2D" for i in range(len(mult))],
        "up_block_types": ["CrossAttnUpBlock2D" if i in att else "UpBlock2D" for i in reversed(range(len(mult)))],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": heads if u["num_heads"] is None else u["num_heads"],
        "transformer_layers_per_block": _transformer_layers_per_block(u),
        "cross_attention_dim": u["context_dim"],
        "use_linear_projection": u["use_linear_proj"],
        "upcast_attention": u["upcast_attention"],
        "norm_num_groups": u["norm_groups"],
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
    }
    if u.get("adm_in_channels") is not None:
        out.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=MICRO_CONDITIONING_DIM,
            projection_class_embeddings_input_dim=u["adm_in_channels"],
        )
    return out


def _transformer_layers_per_block(u: dict) -> int | list[int]:
    """diffusers' depths: per level, the middle block taking the last level's entry (1, as in
    diffusers' own configs, at other levels without attention)."""
    middle, per_level = u["transformer_depth"], u.get("transformer_depth_per_level")
    if per_level is None:
        return middle
    last = len(per_level) - 1
    if last in u["attention_levels"] and per_level[last] != middle:
        raise ValueError(
            f"transformer_depth {middle} differs from the deepest level's {per_level[last]}: "
            "diffusers cannot express it"
        )
    return [per_level[i] or (middle if i == last else 1) for i in range(len(per_level))]


def vae_config_from_diffusers(c: dict) -> dict:
    if not isinstance(c, dict):
        raise ValueError(f"a VAE config must be a JSON object, got {type(c).__name__}")
    blocks = list(_get(c, "block_out_channels", (128, 256, 512, 512), "ints"))
    ch = blocks[0]
    if any(b % ch for b in blocks):
        raise ValueError(f"block_out_channels {blocks} are not multiples of the first")
    return {
        "in_channels": _get(c, "in_channels", 3, "int"),
        "out_channels": _get(c, "out_channels", 3, "int"),
        "ch": ch,
        "ch_mult": tuple(b // ch for b in blocks),
        "num_res_blocks": _get(c, "layers_per_block", 2, "int"),
        "z_channels": _get(c, "latent_channels", 4, "int"),
        "norm_groups": _get(c, "norm_num_groups", 32, "int"),
        "scaling_factor": _get(c, "scaling_factor", 0.18215, "number"),
    }


def vae_config_to_diffusers(v: dict) -> dict:
    blocks = [v["ch"] * m for m in v["ch_mult"]]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": v["in_channels"],
        "out_channels": v["out_channels"],
        "block_out_channels": blocks,
        "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
        "layers_per_block": v["num_res_blocks"],
        "latent_channels": v["z_channels"],
        "norm_num_groups": v["norm_groups"],
        "scaling_factor": v["scaling_factor"],
        "act_fn": "silu",
    }


def text_config_from_transformers(c: dict, with_projection: bool = False) -> dict:
    """Our CLIPTextConfig fields from a transformers text config.json; ``with_projection`` reads
    `projection_dim` too (a CLIPTextModelWithProjection, SDXL's `text_encoder_2`)."""
    if not isinstance(c, dict):
        raise ValueError(f"a text-encoder config must be a JSON object, got {type(c).__name__}")
    act = _get(c, "hidden_act", "quick_gelu", "str")
    if act == "gelu_pytorch_tanh":
        raise ValueError("hidden_act gelu_pytorch_tanh is not a CLIP text tower activation we support")
    width = _get(c, "hidden_size", 768, "int")
    intermediate = _get(c, "intermediate_size", 3072, "int")
    if intermediate % width:
        raise ValueError(f"intermediate_size {intermediate} is not a multiple of hidden_size {width}")
    return {
        "vocab_size": _get(c, "vocab_size", 49408, "int"),
        "width": width,
        "layers": _get(c, "num_hidden_layers", 12, "int"),
        "heads": _get(c, "num_attention_heads", 12, "int"),
        "mlp_ratio": intermediate // width,
        "max_positions": _get(c, "max_position_embeddings", 77, "int"),
        "activation": act,
        "layer_norm_eps": _get(c, "layer_norm_eps", 1e-5, "number"),
        "skip_layers": 0,
        "projection_dim": _get(c, "projection_dim", 512, "int") if with_projection else None,
    }


def text_config_to_transformers(t: dict, bos_id: int, eos_id: int, pad_id: int) -> dict:
    projection = t.get("projection_dim")
    return {
        "architectures": ["CLIPTextModel" if projection is None else "CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": t["vocab_size"],
        "hidden_size": t["width"],
        "intermediate_size": t["width"] * t["mlp_ratio"],
        "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"],
        "max_position_embeddings": t["max_positions"],
        "hidden_act": t["activation"],
        "layer_norm_eps": t["layer_norm_eps"],
        "projection_dim": t["width"] if projection is None else projection,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
