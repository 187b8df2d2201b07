"""Foreign key names: the only module that knows them.

Our module names are the original single-file (LDM) names, so that layout is mostly a matter of
prefixes. The diffusers layout renames blocks; its renames are *generated* by walking the same
block structure the models' constructors walk, then applying a small suffix table per block kind.
Every function here is a pure `dict[str, Tensor] -> dict[str, Tensor]` (or works on config
dicts); none of them imports a model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# --------------------------------------------------------------------------------------------
# Original single-file (LDM) layout.

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
)


def _take_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def split_single_file(sd: dict[str, torch.Tensor], use_ema: bool = True) -> dict:
    """Split an original single-file checkpoint into our three state dicts.

    Returns {"unet", "vae", "text", "text_format" ("openai" | "openclip"), "ema_used", "unknown"}
    where "unknown" lists keys that belong to none of the networks (for a strict error).
    """
    unet = _take_prefix(sd, UNET_PREFIX)
    ema_used = False
    if use_ema and any(k.startswith(EMA_PREFIX) for k in sd):
        ema = extract_ema(sd, unet.keys())
        if ema is not None:
            unet, ema_used = ema, True
    vae = {k: v for k, v in _take_prefix(sd, VAE_PREFIX).items() if not k.startswith("loss.")}
    if any(k.startswith(OPENCLIP_TEXT_PREFIX) for k in sd):
        text_format = "openclip"
        text = openclip_to_ours(_take_prefix(sd, OPENCLIP_TEXT_PREFIX))
    else:
        text_format = "openai"
        prefix = next((p for p in OPENAI_TEXT_PREFIXES if any(k.startswith(p + "embeddings.") for k in sd)), None)
        text = _take_prefix(sd, prefix) if prefix else {}
        text.pop("embeddings.position_ids", None)
    known = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", *SINGLE_FILE_IGNORED_PREFIXES)
    unknown = [k for k in sd if not k.startswith(known)]
    return {
        "unet": unet,
        "vae": vae,
        "text": text,
        "text_format": text_format,
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
    """Our three state dicts -> one original-layout state dict."""
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    if text_format == "openclip":
        out.update({OPENCLIP_TEXT_PREFIX + k: v for k, v in ours_to_openclip(text).items()})
    else:
        out.update({OPENAI_TEXT_PREFIXES[0] + k: v for k, v in text.items()})
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
    ``keep_projection`` (SDXL's bigG uses it; SD 2.x does not)."""
    out = {}
    for key, value in sd.items():
        if keep_projection and key == _OPENCLIP_PROJECTION:
            out[PROJECTION_KEY] = value.t().contiguous()
            continue
        if key.startswith(_OPENCLIP_DROPPED):
            continue
        if ".attn.in_proj_" in key:
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


# SDXL's original single file holds both text towers under its `conditioner`: OpenAI CLIP ViT-L in
# transformers' names, OpenCLIP ViT-bigG in OpenCLIP's (fused in_proj, transposed projection).
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."


def sdxl_text_from_single_file(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(text, text_2): SDXL's two text towers in our names, from its single file's keys."""
    text = _take_prefix(sd, SDXL_TEXT_PREFIX)
    text.pop("embeddings.position_ids", None)
    return text, openclip_to_ours(_take_prefix(sd, SDXL_TEXT_2_PREFIX), keep_projection=True)


def sdxl_text_to_single_file(text: dict[str, torch.Tensor], text_2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``sdxl_text_from_single_file``."""
    out = {SDXL_TEXT_PREFIX + k: v for k, v in text.items()}
    out.update({SDXL_TEXT_2_PREFIX + k: v for k, v in ours_to_openclip(text_2).items()})
    return out


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if old in key:
            key = key.replace(old, new)
    return key


# --------------------------------------------------------------------------------------------
# diffusers / transformers layout.

# Suffixes inside one block, ours -> diffusers.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of diffusers' VAE attention before 0.14, still found in older folders.
_VAE_ATTENTION_LEGACY = {
    "group_norm": "group_norm",
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def unet_block_pairs(channel_mult: tuple[int, ...], num_res_blocks: int, attention_levels: Iterable[int]):
    """(our module path, diffusers module path, suffix table) for every U-Net module, in the
    order UNetModel's constructor creates them. A transformer's insides (`transformer_blocks.N...`)
    are named alike on both sides, so its depth (per level or not) needs no pairs of its own; SDXL's
    added-conditioning embedding is listed for every model, since a pair renames only the keys a
    model has."""
    attention_levels = set(attention_levels)
    levels = len(channel_mult)
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", {}),
        ("time_embed.2", "time_embedding.linear_2", {}),
        ("label_emb.0.0", "add_embedding.linear_1", {}),
        ("label_emb.0.2", "add_embedding.linear_2", {}),
        ("input_blocks.0.0", "conv_in", {}),
        ("out.0", "conv_norm_out", {}),
        ("out.2", "conv_out", {}),
        ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
        ("middle_block.1", "mid_block.attentions.0", {}),
        ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
    ]
    n = 1
    for level in range(levels):
        for j in range(num_res_blocks):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET))
            if level in attention_levels:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", {}))
            n += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", {}))
            n += 1
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        for i in range(num_res_blocks + 1):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{i}", _UNET_RESNET))
            has_attention = level in attention_levels
            if has_attention:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{i}", {}))
            if level and i == num_res_blocks:
                pairs.append(
                    (f"output_blocks.{n}.{2 if has_attention else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv", {})
                )
            n += 1
    return pairs


def vae_block_pairs(levels: int, num_res_blocks: int):
    """(our module path, diffusers module path, suffix table) for every VAE module."""
    pairs = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in", f"{part}.conv_in", {}),
            (f"{part}.conv_out", f"{part}.conv_out", {}),
            (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
        ]
    for i in range(levels):
        for j in range(num_res_blocks):
            pairs.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i != levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", {}))
        up = levels - 1 - i  # diffusers counts decoder blocks from the deepest level
        for j in range(num_res_blocks + 1):
            pairs.append((f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET))
        if i:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", {}))
    return pairs


def _rename_by_pairs(sd: dict, pairs: list[tuple[str, str, dict]]) -> dict:
    """Rename each key by the longest matching module prefix, then its block's suffix table.
    Keys that match nothing are kept as they are, so a strict load reports them by name."""
    by_prefix = {src: (dst, table) for src, dst, table in pairs}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            src = ".".join(parts[:cut])
            if src in by_prefix:
                dst, table = by_prefix[src]
                rest = ".".join(parts[cut:])
                for old, new in table.items():
                    if rest == old or rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                key = f"{dst}.{rest}"
                break
        out[key] = value
    return out


def _reverse(pairs):
    return [(dst, src, {v: k for k, v in table.items()}) for src, dst, table in pairs]


def unet_ours_to_diffusers(sd: dict, channel_mult, num_res_blocks, attention_levels) -> dict:
    return _rename_by_pairs(sd, unet_block_pairs(channel_mult, num_res_blocks, attention_levels))


def unet_diffusers_to_ours(sd: dict, channel_mult, num_res_blocks, attention_levels) -> dict:
    return _rename_by_pairs(sd, _reverse(unet_block_pairs(channel_mult, num_res_blocks, attention_levels)))


def _is_vae_attention_weight(key: str) -> bool:
    return ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def vae_ours_to_diffusers(sd: dict, levels: int, num_res_blocks: int) -> dict:
    # Our attention projections are 1x1 convolutions ([C, C, 1, 1]); diffusers' are Linear ([C, C]).
    sd = {k: (v[:, :, 0, 0] if _is_vae_attention_weight(k) else v) for k, v in sd.items()}
    return _rename_by_pairs(sd, vae_block_pairs(levels, num_res_blocks))


def vae_diffusers_to_ours(sd: dict, levels: int, num_res_blocks: int) -> dict:
    pairs = _reverse(vae_block_pairs(levels, num_res_blocks))
    legacy = {v: k for k, v in _VAE_ATTENTION.items()}
    legacy.update({old: legacy[new] for old, new in _VAE_ATTENTION_LEGACY.items()})
    pairs = [(src, dst, legacy if table and "group_norm" in table else table) for src, dst, table in pairs]
    out = _rename_by_pairs(sd, pairs)
    return {k: (v[:, :, None, None] if _is_vae_attention_weight(k) and v.ndim == 2 else v) for k, v in out.items()}


TEXT_PREFIX = "text_model."
TEXT_IGNORED = ("text_model.embeddings.position_ids", "text_projection.", "logit_scale")


def text_transformers_to_ours(sd: dict, keep_projection: bool = False) -> dict:
    """transformers' CLIPTextModel (or, with ``keep_projection``, CLIPTextModelWithProjection:
    SDXL's `text_encoder_2`, whose `text_projection.weight` keeps its name) in our names."""
    ignored = tuple(p for p in TEXT_IGNORED if not (keep_projection and p == "text_projection."))
    return {
        k[len(TEXT_PREFIX) :] if k.startswith(TEXT_PREFIX) else k: v for k, v in sd.items() if not k.startswith(ignored)
    }


def text_ours_to_transformers(sd: dict) -> dict:
    # The projection sits beside `text_model`, as in transformers' CLIPTextModelWithProjection.
    return {k if k == PROJECTION_KEY else TEXT_PREFIX + k: v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# LoRA files name the modules they adapt (the file grammar itself lives in stablediff.lora).


def unet_module_names_to_diffusers(names: Iterable[str], channel_mult, num_res_blocks, attention_levels) -> dict:
    """{our U-Net module name: diffusers' name} for modules that have weights (renamed as their
    `.weight` key is, so a block's own module such as `input_blocks.0.0` maps too)."""
    pairs = unet_block_pairs(channel_mult, num_res_blocks, attention_levels)
    renamed = _rename_by_pairs({f"{name}.weight": name for name in names}, pairs)
    return {ours: key.removesuffix(".weight") for key, ours in renamed.items()}


# diffusers' LoRA files before PEFT (2023) named a LoRA after the projection it adapts, inside the
# attention processor (U-Net) or the attention module (text encoder): file name -> module name.
LORA_LEGACY_UNET_MODULES = {
    "processor.to_q_lora": "to_q",
    "processor.to_k_lora": "to_k",
    "processor.to_v_lora": "to_v",
    "processor.to_out_lora": "to_out.0",
}
LORA_LEGACY_TEXT_MODULES = {
    "to_q_lora": "q_proj",
    "to_k_lora": "k_proj",
    "to_v_lora": "v_proj",
    "to_out_lora": "out_proj",
}


# --------------------------------------------------------------------------------------------
# diffusers / transformers config.json <-> our config fields (plain dicts: no model import).

# SDXL's micro-conditioning: each number is embedded 256 wide (diffusers' addition_time_embed_dim;
# the same constant as models.unet.MICRO_CONDITIONING_DIM, which this module may not import).
MICRO_CONDITIONING_DIM = 256
# The configs are strangers' JSON: every value read is type-checked here (ValueError naming the
# key); the sizes are then checked against limits.LIMITS by the caller, which names the file.

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
