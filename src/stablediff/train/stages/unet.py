"""The U-Net stage: train the latent diffusion U-Net (Rombach et al. 2022) against a frozen VAE
and text encoder (or, with ``train_text_encoder``, together with the text encoder); and the
finetune stage, which starts the U-Net from an existing model.

Loss (Ho et al. 2020, eq. 14, with the target of the prediction type): latents ``x0`` (a sample
of the VAE posterior, or of a latent cache), ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
``x_t = q_sample(x0, t, eps)``; MSE between ``unet(x_t, t, text(caption))`` and eps (or v,
Salimans & Ho 2022), optionally weighted per sample by Min-SNR-gamma (Hang et al. 2023). Every
random number comes from the trainer's generator, so runs and resumes are exact.

SDXL (a ``--base`` whose U-Net takes ``y``; finetune and the add-on stages): the U-Net is
conditioned as `train.sdxl` says, on both text encoders and each image's original size, crop and
target size (folder items carry their `ImageGeometry`).

Export: one single-file model (``model.safetensors``: U-Net, VAE, text encoder, the spec and
the training config in its metadata; a trained vocabulary travels in the metadata too) that
``load_pipeline`` reads, and the tokenizer folder next to it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stablediff.diffusion import NoiseSchedule, ScheduleConfig, min_snr_gamma_weights, q_sample, training_target
from stablediff.loading import save
from stablediff.models.unet import UNetConfig, UNetModel
from stablediff.params import GenerationParams
from stablediff.pipeline import StableDiffusion
from stablediff.presets import PRESETS, ModelSpec
from stablediff.shapes import prompt_suite
from stablediff.train.config import TrainConfig
from stablediff.train.data.stage_data import captions_of, unet_data
from stablediff.train.distributed import rank_randn, rank_rows, unwrap
from stablediff.train.exports import MODEL_FILE, TOKENIZER_DIR, TRAIN_CONFIG_KEY, frozen_parts
from stablediff.train.grounding import cross_attention_maps, grounding_loss, item_regions, token_boxes
from stablediff.train.sdxl import INPUTS, SDXLText, batch_time_ids
from stablediff.train.stage import Stage
from stablediff.weights.io import atomic_write_bytes

logger = logging.getLogger(__name__)

# Training sizes beyond the presets; context_dim and the channel counts follow the frozen parts.
UNET_SIZES: dict[str, UNetConfig] = {
    # the bundled shapes model: 16x16x4 latents (64 px, f=4 VAE), 128-wide text; 9.1M parameters
    # (fp16 weights of all three networks stay under 25 MB). Attention at 8x8 and 4x4 only:
    # relations between two shapes need global context, and 16x16 self-attention would cost
    # more than all the convolutions there.
    "shapes-small": UNetConfig(
        model_channels=48,
        channel_mult=(1, 2, 3),
        num_res_blocks=2,
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=24,
        context_dim=128,
        norm_groups=16,
    ),
}
SAMPLE_COUNT = 8  # a 4 x 2 grid


def draw_timesteps(
    n: int, steps: int, generator: torch.Generator, high_fraction: float = 0.0, high_from: int = 0
) -> torch.Tensor:
    """`n` training timesteps [n] int64, uniform over [0, steps) except a `high_fraction` share of
    them (each drawn independently) uniform over the noisiest [high_from, steps)."""
    if not 0 <= high_from < steps:
        raise ValueError(f"high_noise_from must be in [0, {steps}) for a {steps}-step schedule, got {high_from}")
    t = torch.randint(0, steps, (n,), generator=generator)
    if high_fraction > 0:
        high = torch.randint(high_from, steps, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < high_fraction, high, t)
    return t


def unet_size(name: str) -> UNetConfig:
    """The U-Net configuration called `name`: a training size of UNET_SIZES or a preset's U-Net."""
    if name in UNET_SIZES:
        return UNET_SIZES[name]
    if name in PRESETS:
        return PRESETS[name].unet
    raise ValueError(f"unknown U-Net size {name!r}; choose one of {sorted({*UNET_SIZES, *PRESETS})}")


def sample_prompts(config: TrainConfig, held: Dataset) -> list[str]:
    """Fixed prompts for sample grids: shapes evaluation prompts, or the first distinct held-out captions."""
    if config.data == "shapes":
        return [p for p, _ in prompt_suite("single", 6)] + [p for p, _ in prompt_suite("relation", 2)]
    captions = list(dict.fromkeys(c for c in captions_of(held) if c)) or ["a photo"]
    return [captions[i % len(captions)] for i in range(SAMPLE_COUNT)]


class TextConditionedUNet(nn.ModuleDict):
    """{"unet", "text_encoder"} trained together (`train_text_encoder`): token ids in, one forward,
    so DDP wraps it and EMA averages both networks."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self["unet"](x_t, t, self["text_encoder"](ids))


class UNetStage(Stage):
    name = "unet"
    # Sample grids: DPM++ 2M with these settings (a subclass may make them cheaper, as tests do).
    sample_steps = 20
    sample_guidance = 5.0

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        parts = frozen_parts(config, device)
        self.vae, self.text_encoder, self.tokenizer = parts.vae, parts.text_encoder, parts.tokenizer
        self.text_encoder_2, self.tokenizer_2 = parts.text_encoder_2, parts.tokenizer_2
        self.base = parts.base
        self.sdxl = self._sdxl_conditioning()
        self.unet = self._initial_unet().to(device=device, dtype=torch.float32).train()  # bad options fail here
        self._train, self._held, self.latents = unet_data(config, self.vae, geometry=self.sdxl is not None)
        self.model: nn.Module = self.unet
        if config.train_text_encoder:
            self.text_encoder.requires_grad_(True)
            self.model = TextConditionedUNet({"unet": self.unet, "text_encoder": self.text_encoder})
        self.noise = NoiseSchedule(self._schedule_config())
        self.alphas_cumprod = self.noise.alphas_cumprod.to(torch.float32)

    def _sdxl_conditioning(self) -> SDXLText | None:
        """SDXL's conditioner when `config.base` is SDXL base (None otherwise); what is not supported
        on SDXL yet fails here, before any data is read."""
        if self.base is None or not self.base.spec.is_sdxl:
            return None
        c, refused = self.config, []
        if self.text_encoder_2 is None:
            refused.append("an SDXL refiner as --base (it is conditioned on aesthetic scores)")
        if c.train_text_encoder:
            refused.append("train_text_encoder (train LoRAs on both text encoders with lora_text_encoder instead)")
        if c.grounding_weight:
            refused.append("grounding_weight")
        if refused:
            raise ValueError(f"not supported with an SDXL base yet: {'; '.join(refused)}")
        return SDXLText(self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2)

    # -----------------------------------------------------------------------------------------
    def _initial_unet(self) -> UNetModel:
        """A fresh U-Net of `config.model`'s size, PyTorch default initialisation from `config.seed`
        (the same weights in every process)."""
        if self.sdxl is not None:
            raise ValueError(
                f"the {self.name} stage trains a new U-Net; to train on the SDXL base {self.config.base!r} "
                "use the finetune or lora stage"
            )
        z = self.vae.config.z_channels
        cfg = dataclasses.replace(
            unet_size(self.config.model), in_channels=z, out_channels=z, context_dim=self.text_encoder.config.width
        )
        with torch.random.fork_rng(devices=[]):  # seeded without touching the global generator
            torch.manual_seed(self.config.seed)
            return UNetModel(cfg)

    def _schedule_config(self) -> ScheduleConfig:
        return self.base.spec.schedule if self.base is not None else ScheduleConfig()

    def spec(self) -> ModelSpec:
        """The ModelSpec of the model being trained (schedule facts from the base model, if any)."""
        name = f"stablediff-{self.config.stage}-{self.config.model}"
        if self.sdxl is not None:  # everything but the U-Net, the prediction and the size is the base's
            return dataclasses.replace(
                self.base.spec,
                name=name,
                unet=self.unet.config,
                vae=self.vae.config,
                prediction_type=self.config.prediction_type,
                default_size=self.config.resolution,
            )
        s = self.base.spec if self.base is not None else ModelSpec("schedule")
        return ModelSpec(
            name=name,
            unet=self.unet.config,
            vae=self.vae.config,
            text=self.text_encoder.config,
            text_format=s.text_format,
            pad_token=self.tokenizer.pad_token,
            prediction_type=self.config.prediction_type,
            schedule=s.schedule,
            default_size=self.config.resolution,
        )

    def trainable(self) -> nn.Module:
        return self.model

    def lr_scales(self) -> dict[str, float]:
        return {"text_encoder.": self.config.text_encoder_lr_ratio} if self.config.train_text_encoder else {}

    def dataset(self) -> Dataset:
        return self._train

    def collate(self, items: list[tuple[Any, ...]]) -> dict[str, torch.Tensor]:
        """(image [3, S, S] or latent [z, h, w], caption[, regions]) items -> {"x": [B, ...], "ids":
        [B, L] token ids}, and with regions "boxes" [B, L, 4] and "grounded" [B, L] (`token_boxes`);
        SDXL: also "ids_2" (the second tokenizer's) and "time_ids" [B, 6] (`batch_time_ids`)."""
        captions = [item[1] for item in items]
        batch = {"x": torch.stack([item[0] for item in items])}
        if self.sdxl is not None:
            return {**batch, **self.sdxl.tokenize(captions), "time_ids": batch_time_ids(items)}
        batch["ids"] = torch.tensor(self.tokenizer(captions), dtype=torch.long)
        regions = [item_regions(item) for item in items]
        if all(r is not None for r in regions):
            boxes = [token_boxes(self.tokenizer, item[1], r) for item, r in zip(items, regions, strict=True)]
            batch["boxes"] = torch.stack([b for b, _ in boxes])
            batch["grounded"] = torch.stack([g for _, g in boxes])
        return batch

    # -----------------------------------------------------------------------------------------
    def _latents_and_condition(
        self, batch: dict, generator: torch.Generator, global_batch: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (cached, or a posterior sample) and what the trained model is conditioned on: the
        frozen text encoder's context, or the token ids when the text encoder trains too.
        `global_batch`: in a training step the posterior noise is this process's rows of the global
        batch's draw (rank_randn); evaluation runs in one process and draws for its own batch."""
        x = batch["x"].to(self.device, non_blocking=True)
        with torch.no_grad():
            if self.latents:
                latents = x
            else:
                posterior = self.vae.encode(x)
                shape = posterior.mean.shape
                latents = posterior.sample(
                    noise=rank_randn(generator, shape) if global_batch else torch.randn(shape, generator=generator)
                )
            condition = self._condition(batch)
        return latents.float(), condition

    def _condition(self, batch: dict) -> Any:
        """What `_predict` conditions on (computed without gradients): the frozen text encoder's
        context, or the token ids when the text encoder trains too; SDXL: the U-Net's keyword
        arguments {"context", "y"}."""
        if self.sdxl is not None:
            return self.sdxl(self._sdxl_inputs(batch))
        ids = batch["ids"].to(self.device, non_blocking=True)
        return ids if self.config.train_text_encoder else self.text_encoder(ids)

    def _sdxl_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {key: batch[key].to(self.device, non_blocking=True) for key in INPUTS}

    def _predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """The trained network's prediction (eps, v or x0) for `x_t` at float timesteps `t`."""
        if isinstance(condition, dict):  # SDXL: context and y
            return model(x_t, t, **condition)
        return model(x_t, t, condition)

    def _loss(
        self, model: nn.Module, latents: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample (weighted) MSE [B] for timesteps `t` [B] (int64) and `noise` like `latents`."""
        t = t.to(self.device)
        noise = noise.to(self.device)
        x_t = q_sample(latents, t, noise, self.alphas_cumprod)
        target = training_target(self.config.prediction_type, latents, noise, t, self.alphas_cumprod)
        prediction = self._predict(model, x_t, t.float(), condition)
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        c = self.config
        if c.min_snr_gamma > 0 or c.snr_floor > 0:
            per_sample = per_sample * min_snr_gamma_weights(
                t, self.alphas_cumprod, c.min_snr_gamma or math.inf, c.prediction_type, floor=c.snr_floor
            )
        return per_sample

    def loss(self, model: nn.Module, batch: Any, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        latents, condition = self._latents_and_condition(batch, generator, global_batch=True)
        b = latents.shape[0]
        c, steps = self.config, self.noise.config.num_train_timesteps
        t = rank_rows(lambda n: draw_timesteps(n, steps, generator, c.high_noise_fraction, c.high_noise_from), b)
        noise = rank_randn(generator, latents.shape)
        if not c.grounding_weight:
            per_sample = self._loss(model, latents, condition, t, noise)
            return per_sample.mean(), {"latent_std": float(latents.std())}
        with cross_attention_maps(self.unet) as maps:
            per_sample = self._loss(model, latents, condition, t, noise)
        grounding = grounding_loss(maps, batch["boxes"], batch["grounded"], latents.shape[-2:]).mean()
        loss = per_sample.mean() + c.grounding_weight * grounding
        return loss, {
            "latent_std": float(latents.std()),
            "denoising": float(per_sample.detach().mean()),
            "grounding": float(grounding.detach()),
        }

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out loss at evenly spaced timesteps with fixed noise: comparable between steps and runs."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed + 1)
        loader = DataLoader(self._held, batch_size=c.batch_size, collate_fn=self.collate)
        total, count = 0.0, 0
        steps = self.noise.config.num_train_timesteps
        for batch in loader:
            latents, condition = self._latents_and_condition(batch, generator)
            b = latents.shape[0]
            t = ((torch.arange(count, count + b) * 0.618034) % 1.0 * steps).long()  # spread over [0, T)
            noise = torch.randn(latents.shape, generator=generator)
            total += float(self._loss(model, latents, condition, t, noise).sum())
            count += b
        return {"loss": total / max(count, 1)}

    # -----------------------------------------------------------------------------------------
    def pipeline(self, model: nn.Module):
        """A StableDiffusion of `model` (the U-Net being trained, or its EMA) and the frozen parts."""
        net = unwrap(model)
        if isinstance(net, TextConditionedUNet):
            return StableDiffusion(net["unet"], self.vae, net["text_encoder"], self.tokenizer, self.spec())
        return self._pipeline_of(net)

    def _pipeline_of(self, unet: UNetModel) -> StableDiffusion:
        """A StableDiffusion of `unet` and the frozen parts (SDXL: both text encoders)."""
        return StableDiffusion(
            unet, self.vae, self.text_encoder, self.tokenizer, self.spec(),
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
        )  # fmt: skip

    def grid_prompts(self) -> list[str]:
        """The sample grid's prompts (`sample_prompts`)."""
        return sample_prompts(self.config, self._held)

    def sample(self, model: nn.Module, path: Path) -> None:
        """A 4 x 2 grid for fixed prompts and seeds (image k: seed k): DPM++ 2M, 20 steps, guidance 5."""
        pipe = self.pipeline(model)
        size = self.config.resolution
        images = []
        for k, prompt in enumerate(self.grid_prompts()[:SAMPLE_COUNT]):
            params = GenerationParams(
                prompt=prompt,
                width=size,
                height=size,
                steps=self.sample_steps,
                guidance_scale=self.sample_guidance,
                sampler="dpmpp_2m",
                seed=k,
            )
            images += pipe.generate(params)
        columns = 4
        rows = (len(images) + columns - 1) // columns
        grid = Image.new("RGB", (columns * size, rows * size), "white")
        for k, image in enumerate(images):
            grid.paste(image, ((k % columns) * size, (k // columns) * size))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())

    def export(self, model: nn.Module, out_dir: Path) -> Path:
        """`out_dir/model.safetensors` (a single-file model with the training config in its metadata)
        and `out_dir/tokenizer/`; returns the model file."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(out_dir / TOKENIZER_DIR)
        path = save(
            self.pipeline(model),
            out_dir / MODEL_FILE,
            overwrite=True,
            metadata={TRAIN_CONFIG_KEY: self.config.to_json()},
        )
        logger.info("U-Net model exported to %s", path)
        return path


class FinetuneStage(UNetStage):
    """The U-Net stage starting from `config.base`: its U-Net (and, unless overridden by
    `config.vae` / `config.text` / `config.tokenizer`, its VAE, text encoder and tokenizer)."""

    name = "finetune"

    def __init__(self, config: TrainConfig, device: torch.device):
        if not config.base:
            raise ValueError(
                "the finetune stage needs --base: the model to continue training "
                "(a single-file checkpoint or a diffusers folder)"
            )
        super().__init__(config, device)

    def _initial_unet(self) -> UNetModel:
        unet = self.base.unet
        width = sum(e.config.width for e in (self.text_encoder, self.text_encoder_2) if e is not None)
        if unet.config.context_dim != width:
            raise ValueError(
                f"the base U-Net attends to {unet.config.context_dim}-wide text, the text encoder gives {width}"
            )
        if self.base.spec.prediction_type != self.config.prediction_type:
            logger.warning(
                "base model predicts %s; finetuning it to predict %s",
                self.base.spec.prediction_type,
                self.config.prediction_type,
            )
        self.base.unet = None  # the stage owns it now; the base keeps only the frozen parts
        return unet.requires_grad_(True)


class AddonStage(FinetuneStage):
    """What the add-on stages share (stages/lora.py, stages/embedding.py): every network of
    `config.base` stays frozen, the U-Net too, and what trains is the small module `make_addon`
    returns (made before the data is read, so that bad options fail first). The spec, and so the
    prediction type and schedule, are the base's: an add-on cannot change what the model predicts.
    """

    name = ""

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        # No dropout anywhere: train mode only lets the frozen U-Net checkpoint its activations.
        self.unet.requires_grad_(False).train(config.gradient_checkpointing)
        self.unet.gradient_checkpointing = config.gradient_checkpointing
        self.model = self.addon

    def make_addon(self, unet: UNetModel) -> nn.Module:
        """The trainable module for the frozen `unet` (and `self.text_encoder`, `self.tokenizer`)."""
        raise NotImplementedError

    def _initial_unet(self) -> UNetModel:
        expected = self.base.spec.prediction_type
        if self.config.prediction_type != expected:
            raise ValueError(
                f"the base model predicts {expected}: pass --prediction_type={expected} "
                f"(the {self.name} stage trains against the frozen base and cannot change that)"
            )
        unet = self.base.unet.to(device=self.device, dtype=torch.float32).requires_grad_(False)
        self.addon = self.make_addon(unet)
        return unet

    def spec(self) -> ModelSpec:
        return self.base.spec

    def base_pipeline(self) -> StableDiffusion:
        """The frozen base model as a pipeline (sample grids add the add-on to it)."""
        return self._pipeline_of(self.unet)

    def shared_config(self) -> str:
        """The training config for an exported file's metadata, every path reduced to its last
        part: add-ons are shared, and a path on this machine says nothing useful elsewhere."""
        values = dataclasses.asdict(self.config)
        for key in ("data", "out", "base", "vae", "text", "tokenizer"):
            values[key] = Path(values[key]).name if values[key] else ""
        return json.dumps(values, indent=2, sort_keys=True)


__all__ = [
    "UNET_SIZES",
    "AddonStage",
    "FinetuneStage",
    "TextConditionedUNet",
    "UNetStage",
    "draw_timesteps",
    "unet_size",
]
