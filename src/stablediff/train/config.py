"""TrainConfig: every knob of a training run, typed, validated, saved with the run.

`--key=value` overrides are parsed against the field types (int, float, bool, str, optional and
tuple fields), so a typo or a bad value is an error naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import string
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from stablediff.diffusion import PREDICTION_TYPES
from stablediff.embeddings import MAX_VECTORS
from stablediff.lora.build import UNET_TARGETS
from stablediff.train.stages import ADDONS, STAGES

MIXED_PRECISION = ("no", "bf16")
UNET_STAGES = ("unet", "finetune", "lora", "embedding")  # the stages that train on the denoising loss
LORA_TARGETS = tuple(UNET_TARGETS)


@dataclass
class TrainConfig:
    stage: str = "unet"
    data: str = ""  # a captioned folder, a latent cache (.safetensors), or "shapes" (drawn on the fly)
    out: str = ""  # the run folder
    seed: int = 0

    # model size: a preset name from stablediff.presets, or a built-in training size ("shapes-small")
    model: str = "tiny"
    base: str = ""  # finetune: the checkpoint to continue; unet: where the frozen VAE/text come from
    vae: str = ""  # unet stage: a trained VAE run folder or model (overrides `base` for the VAE)
    text: str = ""  # unet stage: a trained text-encoder run folder (overrides `base` for text + tokenizer)
    tokenizer: str = ""  # vae/text/unet: a trained tokenizer folder (default: the CLIP vocabulary)
    resolution: int = 64
    shapes_size: int = 50000  # when data == "shapes": how many distinct scenes the stream cycles over
    center_crop: bool = True
    flip: bool = False
    # U-Net stages on a captioned folder: aspect-ratio buckets of about resolution**2 pixels
    # (sides multiples of bucket_step, at most bucket_max_aspect : 1) instead of square crops
    buckets: bool = False
    bucket_step: int = 64
    bucket_max_aspect: float = 2.5
    caption_dropout: float = 0.1  # unet: probability of an empty caption (classifier-free guidance)
    strict: bool = False  # stop at the first bad data file instead of skipping (and logging) it

    # optimisation
    steps: int = 1000
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    lr_min_ratio: float = 0.1  # cosine decays to lr * lr_min_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999  # 0 disables EMA
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    nonfinite: str = "stop"  # "stop" at the first non-finite loss, or "skip" the step and count it
    num_workers: int = 0

    # diffusion (unet, finetune)
    prediction_type: str = "epsilon"
    min_snr_gamma: float = 0.0  # 0 disables min-SNR weighting (Hang et al. 2023)
    # Train the text encoder with the U-Net on the denoising loss (as DreamBooth's --train_text_encoder):
    # a text tower trained only contrastively need not say which object a relation puts where.
    train_text_encoder: bool = False
    text_encoder_lr_ratio: float = 1.0  # its lr as a multiple of the U-Net's (the same warm-up and cosine)
    # Where each object goes is decided at the noisiest timesteps, which the eps loss barely weighs
    # (its weight in x0 terms is the SNR, 0.008 at t = 950): a share of each batch drawn from
    # [high_noise_from, T), and a floor on every sample's x0 weight (truncated SNR, Salimans & Ho).
    high_noise_fraction: float = 0.0
    high_noise_from: int = 700
    snr_floor: float = 0.0  # 0: none
    # Grounding loss (TokenCompose, Wang et al. 2024): the weight of a term that pulls each word
    # naming an object onto that object's box in the U-Net's cross-attention maps. Needs data
    # whose items carry grounding regions (shapes, or a latent cache that stores them).
    grounding_weight: float = 0.0  # 0: off

    # lora: a LoRA for the frozen model --base (docs/training.md)
    lora_rank: int = 16
    lora_alpha: float = 0.0  # 0: the rank (scale alpha / rank = 1)
    lora_targets: str = "attention"  # "attention": to_q/k/v/out.0; "transformer": + ff, proj_in/out
    lora_conv_rank: int = 0  # > 0: LoCon, also the residual blocks' and samplers' convolutions
    lora_conv_alpha: float = 0.0  # 0: the conv rank
    lora_text_encoder: bool = False  # also the text encoder's q/k/v/out_proj and fc1/fc2

    # embedding: textual inversion for --base
    token: str = ""  # the new word; must not be a word of the vocabulary
    init_word: str = ""  # the vectors start as this word's token embeddings (cycled)
    num_vectors: int = 1
    embedding_template: str = "{token}, {caption}"  # each training caption; "{token}" alone when it is empty

    # vae
    kl_weight: float = 1e-6
    recon_loss: str = "l1"  # "l1" | "l2"
    # Extra weight of foreground pixels (those far from the image's border colour) in the
    # reconstruction loss: small objects on flat backgrounds are otherwise learnt last.
    recon_focus: float = 0.0
    disc_weight: float = 0.0  # 0 disables the patch discriminator; scales LDM's adaptive weight
    disc_start: int = 0  # step at which the discriminator loss starts

    # text (contrastive)
    init_temperature: float = 0.07
    # Also score each image against its caption with the relation turned round (a false caption
    # only the relation tells apart): random batches almost never hold such a pair.
    hard_negatives: bool = False

    # tokenizer
    vocab_size: int = 1024

    # bookkeeping
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    eval_every: int = 0
    save_every: int = 500
    keep_last: int = 2
    eval_size: int = 256  # held-out examples for PSNR / retrieval accuracy

    def __post_init__(self) -> None:
        choices = {
            "stage": tuple(STAGES),
            "prediction_type": tuple(PREDICTION_TYPES),
            "mixed_precision": MIXED_PRECISION,
            "nonfinite": ("stop", "skip"),
            "recon_loss": ("l1", "l2"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        positive = (
            "steps",
            "batch_size",
            "grad_accum",
            "resolution",
            "log_every",
            "keep_last",
            "vocab_size",
            "lora_rank",
            "num_vectors",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "lr",
            "weight_decay",
            "grad_clip",
            "kl_weight",
            "disc_weight",
            "min_snr_gamma",
            "recon_focus",
            "snr_floor",
            "grounding_weight",
            "lora_alpha",  # 0: the rank
            "lora_conv_rank",
            "lora_conv_alpha",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("caption_dropout", "ema_decay", "lr_min_ratio", "high_noise_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {self.init_temperature}")
        if self.stage == "tokenizer" and self.vocab_size < 514:
            raise ValueError(
                f"vocab_size must be >= 514 (256 bytes, 256 word-final bytes, BOS, EOS), got {self.vocab_size}"
            )
        if self.hard_negatives and self.stage != "text":
            raise ValueError(f"hard_negatives is for the text stage, not {self.stage!r}")
        if self.train_text_encoder and self.stage not in ("unet", "finetune"):
            raise ValueError(f"train_text_encoder is for the unet and finetune stages, not {self.stage!r}")
        if self.text_encoder_lr_ratio <= 0:
            raise ValueError(f"text_encoder_lr_ratio must be > 0, got {self.text_encoder_lr_ratio}")
        if self.text_encoder_lr_ratio != 1.0 and not self.train_text_encoder:
            raise ValueError(
                "text_encoder_lr_ratio needs train_text_encoder = true: the text encoder is frozen otherwise"
            )
        if self.grounding_weight and self.stage not in ("unet", "finetune"):
            raise ValueError(f"grounding_weight is for the unet and finetune stages, not {self.stage!r}")
        if self.grounding_weight and self.gradient_checkpointing:
            raise ValueError(
                "grounding_weight needs the attention maps of the forward pass: turn gradient_checkpointing off"
            )
        self._check_addons()
        if self.min_snr_gamma and self.snr_floor > self.min_snr_gamma:
            raise ValueError(f"snr_floor={self.snr_floor} must not exceed min_snr_gamma={self.min_snr_gamma}")
        if self.high_noise_from < 0:
            raise ValueError(f"high_noise_from must be >= 0, got {self.high_noise_from}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.buckets:
            if self.stage not in UNET_STAGES:
                raise ValueError(f"buckets is for the U-Net stages {UNET_STAGES}, not {self.stage!r}")
            from stablediff.train.data.buckets import bucket_shapes  # deferred: train.data imports this module

            bucket_shapes(self.resolution, self.bucket_step, self.bucket_max_aspect)  # checks the three

    def _check_addons(self) -> None:
        """The lora and embedding stages' fields (the token itself is checked against the tokenizer
        when the stage starts)."""
        if self.stage in ADDONS and not self.base:
            raise ValueError(
                f"the {self.stage} stage needs --base: the model it trains for "
                "(a single-file checkpoint or a diffusers folder)"
            )
        others = {"lora_text_encoder": "lora", "lora_conv_rank": "lora", "token": "embedding", "init_word": "embedding"}
        for name, stage in others.items():
            if getattr(self, name) and self.stage != stage:
                raise ValueError(f"{name} is for the {stage} stage, not {self.stage!r}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"lora_targets={self.lora_targets!r} is not one of {LORA_TARGETS}")
        if self.num_vectors > MAX_VECTORS:
            raise ValueError(f"num_vectors must be at most {MAX_VECTORS} (one prompt chunk), got {self.num_vectors}")
        if self.stage != "embedding":
            return
        if not self.token or not self.init_word:
            raise ValueError(
                "the embedding stage needs --token (the new word, not one of the vocabulary) and --init-word "
                "(a word whose token embedding the vectors start from, e.g. 'dog' or 'style')"
            )
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.embedding_template) if f is not None]
        except ValueError:  # an unmatched brace
            names = []
        if names.count("token") != 1 or set(names) - {"token", "caption"}:
            raise ValueError(
                f"embedding_template={self.embedding_template!r} must hold {{token}} once, and otherwise only "
                "{caption} (e.g. '{token}, {caption}' or 'a photo of {token}')"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))

    def save(self, path: Path) -> None:
        from stablediff.weights.io import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    # Fields that may differ between a run and its resumption without changing what is trained.
    RESUMABLE_CHANGES = (
        "steps",
        "log_every",
        "sample_every",
        "eval_every",
        "save_every",
        "keep_last",
        "num_workers",
        "out",
        "nonfinite",
    )

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields that differ from `other` and matter for resuming, as 'name: a != b'."""
        names = [f.name for f in fields(self) if f.name not in self.RESUMABLE_CHANGES]
        return [
            f"{n}: {getattr(other, n)!r} != {getattr(self, n)!r}"
            for n in names
            if getattr(self, n) != getattr(other, n)
        ]


def _convert(name: str, kind, text: str):
    """Parse `text` as the annotated type of field `name`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _convert(name, args[0], text)
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}={text!r}: expected true or false")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"--{name}={text!r}: expected {kind.__name__}") from None
    return text


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A new config with `key=value` (or `--key=value`) overrides applied, validated."""
    hints = typing.get_type_hints(TrainConfig)
    names = {f.name for f in fields(TrainConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not sep:
            raise ValueError(f"override {item!r} must look like --key=value")
        if key not in names:
            close = sorted(n for n in names if n[:3] == key[:3])
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown training option {key!r}{hint}")
        changes[key] = _convert(key, hints[key], value)
    return dataclasses.replace(config, **changes)


__all__ = ["TrainConfig", "apply_overrides"]
