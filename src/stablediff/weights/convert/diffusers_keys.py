"""diffusers' and transformers' key names: the U-Net, VAE and text towers of a diffusers folder.

diffusers renames blocks; its renames are *generated* by walking the same block structure the
models' constructors walk, then applying a small suffix table per block kind, so one table per
block kind covers every configuration (SD 1.x, 2.x, SDXL base and refiner, any tiny layout).
"""

from __future__ import annotations

from collections.abc import Iterable

from stablediff.weights.convert.ldm import PROJECTION_KEY

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
