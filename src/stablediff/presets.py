"""Model specifications: what a checkpoint is, as plain records.

A `ModelSpec` describes the three networks and the facts a sampler needs (noise schedule,
prediction type) that cannot be read from weights. `PRESETS` names the known ones;
`infer_spec` recognises SD 1.x / SD 1.x-inpaint / SD 2.x from an original checkpoint's keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import torch

from stablediff.diffusion.denoiser import PREDICTION_TYPES
from stablediff.diffusion.schedules import ScheduleConfig
from stablediff.models.clip import CLIPTextConfig
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig
from stablediff.weights import convert

TEXT_FORMATS = ("openai", "openclip")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    text_format: str = "openai"  # how an original single-file checkpoint stores the text tower
    pad_token: str = "<|endoftext|>"  # SD 2.x pads prompts with "!" instead
    prediction_type: str = "epsilon"  # a name in PREDICTION_TYPES (diffusers' names)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the training noise schedule
    default_size: int = 512  # the image side the model was trained at, in pixels

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} not in {tuple(PREDICTION_TYPES)}")
        if self.text_format not in TEXT_FORMATS:
            raise ValueError(f"text_format {self.text_format!r} not in {TEXT_FORMATS}")
        if self.unet.context_dim != self.text.width:
            raise ValueError(f"UNet context_dim {self.unet.context_dim} != text width {self.text.width}")

    @property
    def is_inpaint(self) -> bool:
        return self.unet.in_channels == 2 * self.vae.z_channels + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Inverse of ``to_json``. Specs written before the schedule became one record store its
        fields flat (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps``); they
        load to the same spec."""
        d = json.loads(text)
        d["unet"] = UNetConfig.from_dict(d["unet"])
        d["vae"] = VAEConfig.from_dict(d["vae"])
        d["text"] = CLIPTextConfig.from_dict(d["text"])
        legacy = {k: d.pop(k) for k in _LEGACY_SCHEDULE_KEYS if k in d}
        if "schedule" in d and legacy:
            raise ValueError(f"a model spec has both a 'schedule' and the flat schedule keys {sorted(legacy)}")
        d["schedule"] = ScheduleConfig(**d.get("schedule", legacy))
        return cls(**d)


# The schedule fields that specs written before `ModelSpec.schedule` store at the top level.
_LEGACY_SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


_SD2_TEXT = CLIPTextConfig(width=1024, layers=24, heads=16, activation="gelu", skip_layers=1)
_SD2_UNET = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True)
_SD2 = dict(text=_SD2_TEXT, text_format="openclip", pad_token="!")

_TINY_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_levels=(1,),
    num_heads=2,
    context_dim=32,
    norm_groups=8,
)
_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)
_TINY_TEXT = CLIPTextConfig(width=32, layers=3, heads=4)

PRESETS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15"),
    "sd15-inpaint": ModelSpec("sd15-inpaint", unet=UNetConfig(in_channels=9)),
    "sd2-base": ModelSpec("sd2-base", unet=_SD2_UNET, **_SD2),
    "sd2": ModelSpec(
        "sd2", unet=replace(_SD2_UNET, upcast_attention=True), prediction_type="v_prediction", default_size=768, **_SD2
    ),
    "sd2-inpaint": ModelSpec("sd2-inpaint", unet=replace(_SD2_UNET, in_channels=9), **_SD2),
    # Small random models for tests: the real structure at a fraction of the size.
    "tiny": ModelSpec("tiny", unet=_TINY_UNET, vae=_TINY_VAE, text=_TINY_TEXT, default_size=64),
    "tiny-sd2": ModelSpec(
        "tiny-sd2",
        unet=replace(_TINY_UNET, num_heads=None, head_dim=16, use_linear_proj=True, context_dim=48),
        vae=_TINY_VAE,
        text=CLIPTextConfig(width=48, layers=3, heads=4, activation="gelu", skip_layers=1),
        text_format="openclip",
        pad_token="!",
        prediction_type="v_prediction",
        default_size=64,
    ),
}


def get_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]


def _count(sd: dict, prefix: str) -> int:
    """Number of consecutive integer children `prefix{i}.` present in sd."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def infer_unet_config(sd: dict[str, torch.Tensor]) -> UNetConfig:
    """A UNetConfig from our-named U-Net weights. Heads cannot be seen in weights: a 1024-wide
    context means SD 2.x (64-wide heads), anything else SD 1.x (8 heads)."""
    if "input_blocks.0.0.weight" not in sd:
        raise ValueError("no U-Net weights found (expected key 'input_blocks.0.0.weight')")
    conv_in = sd["input_blocks.0.0.weight"]
    mc = conv_in.shape[0]
    mult, attention, depth, res_blocks, level = [], [], 1, 0, 0
    n_blocks = _count(sd, "input_blocks.")
    per_level = 0
    for n in range(1, n_blocks):
        if f"input_blocks.{n}.0.op.weight" in sd:
            res_blocks, per_level, level = per_level, 0, level + 1
            continue
        out_ch = sd[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0]
        if per_level == 0:
            mult.append(out_ch // mc)
        if f"input_blocks.{n}.1.norm.weight" in sd and level not in attention:
            attention.append(level)
            depth = _count(sd, f"input_blocks.{n}.1.transformer_blocks.")
        per_level += 1
    res_blocks = res_blocks or per_level
    to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    context = to_k.shape[1]
    linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    heads = {"num_heads": None, "head_dim": 64} if context == 1024 else {"num_heads": 8, "head_dim": None}
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=res_blocks,
        attention_levels=tuple(attention),
        transformer_depth=depth,
        context_dim=context,
        use_linear_proj=linear,
        **heads,
    )


def infer_vae_config(sd: dict[str, torch.Tensor]) -> VAEConfig:
    if "encoder.conv_in.weight" not in sd:
        raise ValueError("no VAE weights found (expected key 'encoder.conv_in.weight')")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(sd, "encoder.down.")
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=_count(sd, "encoder.down.0.block."),
        z_channels=sd["post_quant_conv.weight"].shape[0],
    )


def infer_text_config(sd: dict[str, torch.Tensor], text_format: str) -> CLIPTextConfig:
    if "embeddings.token_embedding.weight" not in sd:
        raise ValueError("no text-encoder weights found (expected the token embedding)")
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    openclip = text_format == "openclip"
    layers = _count(sd, "encoder.layers.")
    return CLIPTextConfig(
        vocab_size=vocab,
        width=width,
        layers=layers,
        heads=max(1, width // 64),
        mlp_ratio=sd["encoder.layers.0.mlp.fc1.weight"].shape[0] // width,
        max_positions=sd["embeddings.position_embedding.weight"].shape[0],
        activation="gelu" if openclip else "quick_gelu",
        skip_layers=1 if openclip and layers > 1 else 0,
    )


def infer_spec(state_dict: dict[str, torch.Tensor], prediction_type: str = "epsilon") -> ModelSpec:
    """Recognise an original single-file checkpoint: SD 1.x, SD 1.x-inpaint or SD 2.x (and
    inpaint). v-prediction cannot be seen in weights, so it is a parameter."""
    parts = convert.split_single_file(state_dict, use_ema=False)
    return spec_from_parts(parts["unet"], parts["vae"], parts["text"], parts["text_format"], prediction_type)


def spec_from_parts(unet: dict, vae: dict, text: dict, text_format: str, prediction_type: str) -> ModelSpec:
    unet_cfg, vae_cfg, text_cfg = infer_unet_config(unet), infer_vae_config(vae), infer_text_config(text, text_format)
    family = "sd2" if text_format == "openclip" else "sd1"
    inpaint = unet_cfg.in_channels == 2 * vae_cfg.z_channels + 1
    return ModelSpec(
        name=family + ("-inpaint" if inpaint else ""),
        unet=unet_cfg,
        vae=vae_cfg,
        text=text_cfg,
        text_format=text_format,
        pad_token="!" if text_format == "openclip" else "<|endoftext|>",
        prediction_type=prediction_type,
        default_size=768 if prediction_type == "v_prediction" else 512,
    )
