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
from stablediff.errors import BadFileError, load_json
from stablediff.limits import LIMITS, check_config, config_from_dict
from stablediff.models.clip import CLIPTextConfig
from stablediff.models.unet import MICRO_CONDITIONING_DIM, UNetConfig
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
    # SDXL's second text tower (OpenCLIP bigG): its context is concatenated after `text`'s, and its
    # pooled output conditions the U-Net too. None for SD 1.x/2.x.
    text_2: CLIPTextConfig | None = None
    pad_token_2: str = "!"  # the second tokenizer's padding (SDXL's tokenizer_2 pads with "!")
    # SDXL base (diffusers' model_index.json flag): an empty negative prompt conditions on zeros
    # rather than on the encoding of "".
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} not in {tuple(PREDICTION_TYPES)}")
        if self.text_format not in TEXT_FORMATS:
            raise ValueError(f"text_format {self.text_format!r} not in {TEXT_FORMATS}")
        width = self.text.width + (self.text_2.width if self.text_2 is not None else 0)
        if self.unet.context_dim != width:
            both = "" if self.text_2 is None else f" ({self.text.width} + {self.text_2.width})"
            raise ValueError(f"UNet context_dim {self.unet.context_dim} != text width {width}{both}")
        if self.is_sdxl and self.micro_conditioning_count not in (5, 6):
            pooled = self.pooled_text.projection_dim or self.pooled_text.width
            raise ValueError(
                f"UNet adm_in_channels {self.unet.adm_in_channels} is not the pooled text width {pooled} plus 5 "
                f"(refiner) or 6 (base) x {MICRO_CONDITIONING_DIM}"
            )

    @property
    def is_inpaint(self) -> bool:
        return self.unet.in_channels == 2 * self.vae.z_channels + 1

    @property
    def is_sdxl(self) -> bool:
        """An SDXL U-Net (base or refiner): it takes the added conditioning `y`."""
        return self.unet.adm_in_channels is not None

    @property
    def pooled_text(self) -> CLIPTextConfig:
        """The tower whose pooled output goes into SDXL's `y`: the last one (bigG)."""
        return self.text if self.text_2 is None else self.text_2

    @property
    def micro_conditioning_count(self) -> int:
        """How many micro-conditioning numbers `y` holds after the pooled embedding (SDXL base: 6,
        original size, crop and target size; the refiner: 5, the aesthetic score for the target
        size); 0 for SD 1.x/2.x."""
        if not self.is_sdxl:
            return 0
        pooled = self.pooled_text.projection_dim or self.pooled_text.width
        return (self.unet.adm_in_channels - pooled) // MICRO_CONDITIONING_DIM

    @property
    def is_refiner(self) -> bool:
        """SDXL's refiner kind: conditioned on an aesthetic score instead of the target size."""
        return self.micro_conditioning_count == 5

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "model spec") -> ModelSpec:
        """Inverse of ``to_json``. Specs written before the schedule became one record store its
        fields flat (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps``); they
        load to the same spec. The text may come from a stranger's file: every field is checked
        (types, ``limits.LIMITS``) before anything is built, and a bad one raises BadFileError
        naming ``where`` and the field."""
        d = load_json(text, where)
        if not isinstance(d, dict):
            raise BadFileError(f"{where}: expected a JSON object, got {type(d).__name__}")
        for part, config in (("unet", UNetConfig), ("vae", VAEConfig), ("text", CLIPTextConfig)):
            if part not in d:
                raise BadFileError(f"{where}: the {part!r} config is missing")
            d[part] = config.from_dict(d[part], f"{where}: {part}")
        legacy = {k: d.pop(k) for k in _LEGACY_SCHEDULE_KEYS if k in d}
        if "schedule" in d and legacy:
            raise BadFileError(f"{where}: both a 'schedule' and the flat schedule keys {sorted(legacy)}")
        d["schedule"] = config_from_dict(ScheduleConfig, d.get("schedule", legacy), f"{where}: schedule")
        if d.get("text_2") is not None:  # absent or null: no second text tower (SD 1.x/2.x)
            d["text_2"] = CLIPTextConfig.from_dict(d["text_2"], f"{where}: text_2")
        return config_from_dict(cls, d, where, nested=("unet", "vae", "text", "schedule", "text_2"))


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

# SDXL's two text towers (Podell et al. 2023), both read at the penultimate layer without the final
# layer norm: OpenAI CLIP ViT-L/14 (SD 1.x's) and OpenCLIP ViT-bigG/14, whose projected pooled
# output also conditions the U-Net. The tiny ones have the same features at test size.
SDXL_TEXT_L = CLIPTextConfig(skip_layers=1, context_norm=False)
SDXL_TEXT_G = CLIPTextConfig(
    width=1280, layers=32, heads=20, activation="gelu", skip_layers=1, context_norm=False, projection_dim=1280
)
TINY_SDXL_TEXT_L = CLIPTextConfig(width=32, layers=3, heads=4, skip_layers=1, context_norm=False)
TINY_SDXL_TEXT_G = CLIPTextConfig(
    width=32, layers=3, heads=4, activation="gelu", skip_layers=1, context_norm=False, projection_dim=32
)

# SDXL's U-Nets (Podell et al. 2023; Stability's sd_xl_base.yaml / sd_xl_refiner.yaml): no
# attention at full resolution, 64-wide heads, linear projections, and the added conditioning `y`
# (pooled text embedding of the last text tower + 256 wide per micro-conditioning number).
SDXL_UNET = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4),
    attention_levels=(1, 2),
    num_heads=None,
    head_dim=64,
    transformer_depth=10,
    transformer_depth_per_level=(0, 2, 10),
    context_dim=2048,  # OpenAI CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280) concatenated
    use_linear_proj=True,
    adm_in_channels=2816,  # 1280 pooled + 6 x 256: original size, crop, target size
)
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    attention_levels=(1, 2),
    num_heads=None,
    head_dim=64,
    transformer_depth=4,
    context_dim=1280,  # OpenCLIP ViT-bigG only
    use_linear_proj=True,
    adm_in_channels=2560,  # 1280 pooled + 5 x 256: original size, crop, aesthetic score
)
# The same features at test size: per-level depth, added conditioning, 16-wide heads.
TINY_SDXL_UNET = UNetConfig(
    model_channels=16,
    channel_mult=(1, 2, 4),
    attention_levels=(1, 2),
    num_heads=None,
    head_dim=16,
    transformer_depth=2,
    transformer_depth_per_level=(0, 1, 2),
    context_dim=64,
    use_linear_proj=True,
    norm_groups=8,
    adm_in_channels=32 + 6 * 256,
)

TINY_SDXL_REFINER_UNET = replace(
    TINY_SDXL_UNET,
    channel_mult=(1, 2, 4, 4),
    transformer_depth_per_level=None,
    context_dim=32,
    adm_in_channels=32 + 5 * 256,
)
# SDXL's VAE is SD's architecture with its own latent scale; SDXL samples with Euler, "leading"
# spacing (the scheduler_config.json of stable-diffusion-xl-base-1.0).
_SDXL_VAE = VAEConfig(scaling_factor=0.13025)
_SDXL_SCHEDULE = ScheduleConfig(timestep_spacing="leading")
_TINY_SDXL_VAE = replace(_TINY_VAE, scaling_factor=0.13025)
_XL_BASE = dict(schedule=_SDXL_SCHEDULE, force_zeros_for_empty_prompt=True)
# The refiner reads bigG alone: it is the spec's only text tower (`text`), tokenised with "!" padding.
_REFINER = dict(text_format="openclip", pad_token="!", schedule=_SDXL_SCHEDULE)

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
    "sdxl": ModelSpec(
        "sdxl", unet=SDXL_UNET, vae=_SDXL_VAE, text=SDXL_TEXT_L, text_2=SDXL_TEXT_G, default_size=1024, **_XL_BASE
    ),
    "sdxl-refiner": ModelSpec(
        "sdxl-refiner", unet=SDXL_REFINER_UNET, vae=_SDXL_VAE, text=SDXL_TEXT_G, default_size=1024, **_REFINER
    ),
    "tiny-sdxl": ModelSpec(
        "tiny-sdxl",
        unet=TINY_SDXL_UNET,
        vae=_TINY_SDXL_VAE,
        text=TINY_SDXL_TEXT_L,
        text_2=TINY_SDXL_TEXT_G,
        default_size=64,
        **_XL_BASE,
    ),
    "tiny-sdxl-refiner": ModelSpec(
        "tiny-sdxl-refiner",
        unet=TINY_SDXL_REFINER_UNET,
        vae=_TINY_SDXL_VAE,
        text=TINY_SDXL_TEXT_G,
        default_size=64,
        **_REFINER,
    ),
}


def get_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]


def _count(sd: dict, prefix: str, limit: int | None = None) -> int:
    """Number of consecutive integer children `prefix{i}.` present in sd (one pass over the keys);
    more than ``limit`` is a ValueError: no real model has them."""
    found = set()
    for key in sd:
        if key.startswith(prefix):
            head = key[len(prefix) :].partition(".")[0]
            if head.isascii() and head.isdigit() and len(head) < 9:
                found.add(int(head))
    n = 0
    while n in found:
        n += 1
    if limit is not None and n > limit:
        raise ValueError(f"{n} numbered blocks '{prefix}N.': more than any real model has (the limit is {limit})")
    return n


def _weight(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"weight {key!r} is missing")
    return sd[key]


def _shape(sd: dict, key: str, ndim: int) -> tuple[int, ...]:
    """The shape of weight ``key``: it must exist, with ``ndim`` dimensions, none of them empty."""
    shape = tuple(_weight(sd, key).shape)
    if len(shape) != ndim or 0 in shape:
        raise ValueError(f"weight {key!r} has shape {shape}; expected {ndim} non-empty dimensions")
    return shape


# Counts of numbered blocks a file's keys may show, from LIMITS: the U-Net's input blocks (the
# stem, then per level its res blocks and a downsampler), the VAE's levels, the text tower's layers.
_UNET = LIMITS["UNetConfig"]
_MAX_INPUT_BLOCKS = 1 + _UNET["channel_mult"].max_len * (int(_UNET["num_res_blocks"].hi) + 1)


def infer_unet_config(sd: dict[str, torch.Tensor], like: UNetConfig | None = None) -> UNetConfig:
    """A UNetConfig from our-named U-Net weights. Heads cannot be seen in weights: a 1024-wide
    context (SD 2.x) or an added-conditioning embedding (SDXL base and refiner) means 64-wide
    heads, anything else SD 1.x (8 heads). With ``like``, the fields the weights do not show
    (heads, norm groups, upcasting) are taken from it instead."""
    if "input_blocks.0.0.weight" not in sd:
        raise ValueError("no U-Net weights found (expected key 'input_blocks.0.0.weight')")
    conv_in = _shape(sd, "input_blocks.0.0.weight", 4)
    mc = conv_in[0]
    max_depth = int(_UNET["transformer_depth"].hi)
    mult, depths, res_blocks, level = [], {}, 0, 0  # depths: {attention level: transformer blocks}
    n_blocks = _count(sd, "input_blocks.", _MAX_INPUT_BLOCKS)
    per_level = 0
    for n in range(1, n_blocks):
        if f"input_blocks.{n}.0.op.weight" in sd:
            res_blocks, per_level, level = per_level, 0, level + 1
            continue
        out_ch = _shape(sd, f"input_blocks.{n}.0.out_layers.3.weight", 4)[0]
        if per_level == 0:
            mult.append(out_ch // mc)
        if f"input_blocks.{n}.1.norm.weight" in sd and level not in depths:
            depths[level] = _count(sd, f"input_blocks.{n}.1.transformer_blocks.", max_depth)
        per_level += 1
    res_blocks = res_blocks or per_level
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is None or to_k.ndim != 2:
        raise ValueError("no cross-attention weights (keys ending 'attn2.to_k.weight', 2-D) found")
    depth = _count(sd, "middle_block.1.transformer_blocks.", max_depth)
    if not depth:
        raise ValueError("no middle-block transformer found (keys 'middle_block.1.transformer_blocks.N.')")
    per_level_depths = tuple(depths.get(i, 0) for i in range(len(mult)))
    adm = _shape(sd, "label_emb.0.0.weight", 2)[1] if "label_emb.0.0.weight" in sd else None
    context = to_k.shape[1]
    linear = _weight(sd, "middle_block.1.proj_in.weight").ndim == 2
    shapes = dict(
        in_channels=conv_in[1],
        out_channels=_shape(sd, "out.2.weight", 4)[0],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=res_blocks,
        attention_levels=tuple(depths),
        transformer_depth=depth,
        # one spelling per model: per level only where the levels differ from the middle block
        transformer_depth_per_level=None if set(depths.values()) <= {depth} else per_level_depths,
        context_dim=context,
        use_linear_proj=linear,
        adm_in_channels=adm,
    )
    if like is not None:
        return replace(like, **shapes)
    wide_heads = context == 1024 or adm is not None
    heads = {"num_heads": None, "head_dim": 64} if wide_heads else {"num_heads": 8, "head_dim": None}
    return UNetConfig(**shapes, **heads)


def infer_vae_config(sd: dict[str, torch.Tensor], like: VAEConfig | None = None) -> VAEConfig:
    """A VAEConfig from our-named VAE weights; with ``like``, norm groups and scaling factor from it."""
    if "encoder.conv_in.weight" not in sd:
        raise ValueError("no VAE weights found (expected key 'encoder.conv_in.weight')")
    conv_in = _shape(sd, "encoder.conv_in.weight", 4)
    ch = conv_in[0]
    levels = _count(sd, "encoder.down.", LIMITS["VAEConfig"]["ch_mult"].max_len)
    mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", 4)[0] // ch for i in range(levels))
    shapes = dict(
        in_channels=conv_in[1],
        out_channels=_shape(sd, "decoder.conv_out.weight", 4)[0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=_count(sd, "encoder.down.0.block.", int(LIMITS["VAEConfig"]["num_res_blocks"].hi)),
        z_channels=_shape(sd, "post_quant_conv.weight", 4)[0],
    )
    return VAEConfig(**shapes) if like is None else replace(like, **shapes)


def infer_text_config(sd: dict[str, torch.Tensor], text_format: str) -> CLIPTextConfig:
    if "embeddings.token_embedding.weight" not in sd:
        raise ValueError("no text-encoder weights found (expected the token embedding)")
    vocab, width = _shape(sd, "embeddings.token_embedding.weight", 2)
    openclip = text_format == "openclip"
    layers = _count(sd, "encoder.layers.", int(LIMITS["CLIPTextConfig"]["layers"].hi))
    return CLIPTextConfig(
        vocab_size=vocab,
        width=width,
        layers=layers,
        heads=max(1, width // 64),
        mlp_ratio=_shape(sd, "encoder.layers.0.mlp.fc1.weight", 2)[0] // width,
        max_positions=_shape(sd, "embeddings.position_embedding.weight", 2)[0],
        activation="gelu" if openclip else "quick_gelu",
        skip_layers=1 if openclip and layers > 1 else 0,
    )


def infer_spec(state_dict: dict[str, torch.Tensor], prediction_type: str = "epsilon") -> ModelSpec:
    """Recognise an original single-file checkpoint: SD 1.x, SD 1.x-inpaint or SD 2.x (and
    inpaint). v-prediction cannot be seen in weights, so it is a parameter."""
    parts = convert.split_single_file(state_dict, use_ema=False)
    return spec_from_parts(parts["unet"], parts["vae"], parts["text"], parts["text_format"], prediction_type)


def spec_from_parts(unet: dict, vae: dict, text: dict, text_format: str, prediction_type: str) -> ModelSpec:
    """The spec an original checkpoint's three parts show. The weights are a stranger's: a missing
    or misshapen key is a ValueError naming it, and sizes outside LIMITS a BadFileError."""
    unet_cfg = check_config(infer_unet_config(unet), "U-Net weights")
    vae_cfg = check_config(infer_vae_config(vae), "VAE weights")
    text_cfg = check_config(infer_text_config(text, text_format), "text-encoder weights")
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
