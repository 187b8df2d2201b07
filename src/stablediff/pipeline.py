"""The StableDiffusion object: the three networks, the tokenizer and the spec, and generation.

`generate(params)` runs txt2img, img2img (`init_image`, `strength`) or inpainting (`mask`) and
returns PIL images. The steps follow diffusers' pipelines, including the order in which random
numbers are drawn, so that the same weights, seed and settings give the same image:

    encode prompt -> draw noise (CPU generator, seed + k for image k) -> sampling plan (sigmas)
    -> denoiser (eps/v adapter, CFG, inpaint blending) -> sampler -> VAE decode -> images
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image

from stablediff.addons import AddOns
from stablediff.compiled import compile_unet
from stablediff.diffusion import (
    CFGDenoiser,
    Denoiser,
    InpaintDenoiser,
    NoiseSchedule,
    get_sampler,
    sampling_plan,
)
from stablediff.embeddings import embed_tokens
from stablediff.image import (
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    resize_for_model,
    tensor_to_images,
)
from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetModel, micro_conditioning, sdxl_time_ids
from stablediff.models.vae import AutoencoderKL, DiagonalGaussian
from stablediff.params import GenerationParams
from stablediff.presets import ModelSpec
from stablediff.prompts import (
    SDXLConditioning,
    encode_chunks,
    encode_pooled_prompt,
    encode_sdxl_prompt,
    pad_chunks,
    tokenize_prompt,
)
from stablediff.tiling import (
    DEFAULT_TILE,
    available_memory,
    decode_bytes,
    decode_tiled,
    encode_bytes,
    encode_tiled,
    use_tiling,
)
from stablediff.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)
_HALF = (torch.float16, torch.bfloat16)

# callback(step, total_steps): called after each sampler step.
ProgressCallback = Callable[[int, int], None]
# preview(latents): called before the progress callback with the step's estimate of the final
# scaled latents [n, 4, h, w] of the images being sampled (the denoiser's x0), for live previews.
PreviewCallback = Callable[[torch.Tensor], None]


@dataclass
class StableDiffusion(AddOns):
    """A loaded model. Build one with `stablediff.load_pipeline`. Its LoRA and embedding methods
    (`load_lora`, `load_embedding`, ...) come from `AddOns`."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    spec: ModelSpec
    # SDXL base's second text tower (OpenCLIP bigG) and its tokenizer (pads with "!"); None for SD
    # 1.x/2.x and for SDXL's refiner, whose only tower (bigG) is `text_encoder`.
    text_encoder_2: CLIPTextModel | None = field(default=None)
    tokenizer_2: CLIPTokenizer | None = field(default=None)
    source: str | None = field(default=None)  # the file or folder it was loaded from
    # The images of a batch through the U-Net together (True) or one after another (False), each
    # with its own generator either way. One at a time, image k is bit-identical to a batch of one
    # with seed + k; together, equal within rounding, and batched kernels fill a GPU better.
    # None: together on CUDA devices, one at a time elsewhere.
    batch_images: bool | None = field(default=None)
    # VAE tiling (stablediff.tiling, docs/memory.md): "auto" tiles a decode or encode whose estimated
    # peak exceeds `vae_memory_budget` bytes (None: the memory available on the device at the time);
    # "always" and "never" force the choice. `vae_tile_size`: pixels per side of a tile's core.
    # Tiled passes equal untiled ones up to float rounding, in about 2.5-3x the time.
    vae_tiling: str = field(default="auto")
    vae_tile_size: int = field(default=DEFAULT_TILE)
    vae_memory_budget: int | None = field(default=None)
    # What the last `generate` redid in float32 after float16/bfloat16 overflowed: "sampling",
    # "decode", both, or nothing.
    last_fallback: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Feature maps in channels-last layout, oneDNN's and cuDNN's native one (same values).
        self.unet.channels_last = self.vae.channels_last = True

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for net in self.networks():
            net.to(device=device, dtype=dtype)
        return self

    def networks(self) -> tuple[torch.nn.Module, ...]:
        """The U-Net, the VAE and the text encoder(s)."""
        second = () if self.text_encoder_2 is None else (self.text_encoder_2,)
        return (self.unet, self.vae, self.text_encoder, *second)

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Our-named weights of the networks: {"unet", "vae", "text"}, and "text_2" for SDXL base."""
        sds = {"unet": self.unet.state_dict(), "vae": self.vae.state_dict(), "text": self.text_encoder.state_dict()}
        if self.text_encoder_2 is not None:
            sds["text_2"] = self.text_encoder_2.state_dict()
        return sds

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.spec.schedule)

    def compile(self, cache_dir: str | os.PathLike[str] | None = None) -> StableDiffusion:
        """Compile the U-Net for inference (`stablediff.compiled`: inductor, weights frozen, code cached
        in ``cache_dir``). The first generation of each latent size then compiles, which takes a
        minute or two on a CPU the first time and less from the cache; LoRAs are refused after it."""
        if self.loras:
            raise ValueError(
                f"compile() freezes the U-Net's weights, and LoRAs are loaded ({', '.join(self.loras)}): "
                "compile without LoRAs"
            )
        compile_unet(self.unet, cache_dir)
        return self

    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> tuple[torch.Tensor, ...]:
        """(cond, uncond) contexts, each [1, 77 * chunks, width]. Long prompts are split in
        75-token chunks, `(word:1.3)` weights applied, loaded embeddings' tokens read as their vectors
        (see docs/prompts.md). `clip_skip` counts as in the web UIs: 1 = the model's own layer,
        2 = one layer earlier, ..."""
        skip = self.text_encoder.config.skip_layers + clip_skip - 1

        def encode(ids: torch.Tensor, fixes=()) -> torch.Tensor:
            # Textual-inversion vectors go in place of their placeholders' token embeddings.
            rows = embed_tokens(self.text_encoder.embeddings.token_embedding, ids, fixes) if fixes else None
            return self.text_encoder(ids, skip_layers=skip, token_embeds=rows)

        table = self._embedding_table if len(self._embedding_table) else None
        cond, uncond = pad_chunks(
            tokenize_prompt(self.tokenizer, prompt, embeddings=table),
            tokenize_prompt(self.tokenizer, negative_prompt, embeddings=table),
        )
        return encode_chunks(encode, cond, self.device), encode_chunks(encode, uncond, self.device)

    @torch.no_grad()
    def encode_sdxl_prompt(self, params: GenerationParams) -> SDXLConditioning:
        """SDXL's contexts and pooled embeddings for ``params``' prompts (``prompt_2`` /
        ``negative_prompt_2`` for the second tower, clip skip counted as in ``encode_prompt``), as
        diffusers' ``encode_prompt``; the refiner reads ``prompt`` with its one tower (bigG). Loaded
        SDXL embeddings put their clip_l vectors into the first tower, clip_g into the second."""

        def skip(encoder: CLIPTextModel) -> int:
            return encoder.config.skip_layers + params.clip_skip - 1

        def rows(encoder: CLIPTextModel, ids: torch.Tensor, fixes, second: bool) -> torch.Tensor | None:
            return embed_tokens(encoder.embeddings.token_embedding, ids, fixes, second) if fixes else None

        def encode_first(ids: torch.Tensor, fixes=()) -> torch.Tensor:
            encoder = self.text_encoder
            return encoder(ids, skip_layers=skip(encoder), token_embeds=rows(encoder, ids, fixes, False))

        def encode_pooled(ids: torch.Tensor, fixes=()) -> tuple[torch.Tensor, torch.Tensor]:
            return pooled.encode_pooled(ids, skip_layers=skip(pooled), token_embeds=rows(pooled, ids, fixes, True))

        pooled = self.text_encoder if self.text_encoder_2 is None else self.text_encoder_2
        zeros = self.spec.force_zeros_for_empty_prompt
        table = self._embedding_table if len(self._embedding_table) else None
        if self.text_encoder_2 is None:
            return encode_pooled_prompt(
                self.tokenizer, encode_pooled, params.prompt, params.negative_prompt,
                force_zeros_for_empty_prompt=zeros, device=self.device,
            )  # fmt: skip
        return encode_sdxl_prompt(
            (self.tokenizer, self.tokenizer_2),
            (encode_first, encode_pooled),
            params.prompt,
            params.negative_prompt,
            params.prompt_2,
            params.negative_prompt_2,
            force_zeros_for_empty_prompt=zeros,
            embeddings=table,
            device=self.device,
        )

    def sdxl_time_ids(self, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-conditioning numbers of the conditional and unconditional halves, as diffusers'
        SDXL pipelines build them: sizes default to the image size (height, width); the negative
        half takes ``negative_original_size`` / ``negative_target_size`` where given (else the
        conditional values) with crops (0, 0), diffusers' default ``negative_crops_coords_top_left``;
        the refiner has the aesthetic scores in place of the target size."""
        size = (params.height, params.width)
        original, crops = params.original_size or size, params.crops_coords_top_left
        target = params.target_size or size
        if self.spec.is_refiner:
            negative_original = params.negative_original_size or original
            return (
                sdxl_time_ids(original, crops, aesthetic_score=params.aesthetic_score),
                sdxl_time_ids(negative_original, (0, 0), aesthetic_score=params.negative_aesthetic_score),
            )
        cond = sdxl_time_ids(original, crops, target)
        if params.negative_original_size is None and params.negative_target_size is None:
            return cond, cond  # diffusers: the unconditional half repeats the conditional ids
        negative = (params.negative_original_size or original, (0, 0), params.negative_target_size or target)
        return cond, sdxl_time_ids(*negative)

    def resolve_params(self, params: GenerationParams) -> GenerationParams:
        """`params` as a generation uses them: a width or height of None becomes the model's own image
        size (`spec.default_size`). Record these with the images, not the params passed in."""
        return params.with_default_size(self.spec.default_size)

    @torch.no_grad()
    def generate(
        self,
        params: GenerationParams,
        callback: ProgressCallback | None = None,
        preview: PreviewCallback | None = None,
        *,
        init_latents: torch.Tensor | None = None,
    ) -> list[Image.Image]:
        """Images for `params` (resolved by `resolve_params` and validated first; nothing is computed
        for invalid params).

        A non-finite result is never returned. With the U-Net in float16/bfloat16, the sampling
        stops at the first step whose estimate is NaN or inf and runs again with the networks in
        float32 (progress starts over); a decoded image that is not finite from a half-precision VAE
        is decoded again in float32. Each fallback logs a warning and is named in `last_fallback`;
        the weights are back in their dtype afterwards, bit for bit. What stays non-finite in
        float32 is a ValueError that says where it arose: in the latents or in the decoded image.

        ``init_latents``: a base model's latents from a run with ``denoising_end`` (``sample_latents``),
        continued from ``params.denoising_start`` (an SDXL refiner, or the base itself)."""
        self.last_fallback = ()
        half = self.dtype in _HALF
        try:
            watch = _stop_when_non_finite(preview) if half else preview
            latents = self.sample_latents(params, callback, watch, init_latents=init_latents)
            overflowed = half and not torch.isfinite(latents).all()
        except _NonFinite:
            overflowed = True
        if overflowed:
            nets = [net for net in self.networks() if net is not self.vae or params.init_image is not None]
            self._fall_back("sampling", f"the U-Net in {self.dtype}")
            with _in_float32(*nets):
                latents = self.sample_latents(params, callback, preview, init_latents=init_latents)
        if not torch.isfinite(latents).all():
            raise ValueError(
                f"the latents became non-finite (NaN or inf) during sampling, with the U-Net in {self.dtype}"
                f"{' and again in float32' if overflowed else ''}: the weights may hold NaN or inf, or the "
                "guidance scale overflows"
            )
        images = self.decode(latents)
        vae_dtype = next(self.vae.parameters()).dtype
        retried = vae_dtype in _HALF and not torch.isfinite(images).all()
        if retried:
            self._fall_back("decode", f"the VAE in {vae_dtype}")
            with _in_float32(self.vae):
                images = self.decode(latents)
        if not torch.isfinite(images).all():
            raise ValueError(
                f"the decoded image became non-finite (NaN or inf) with the VAE in {vae_dtype}"
                f"{' and again in float32' if retried else ''}, although the latents were finite: "
                "the VAE weights may hold NaN or inf"
            )
        return tensor_to_images(images)

    def _fall_back(self, part: str, where: str) -> None:
        self.last_fallback += (part,)
        logger.warning("%s overflowed (NaN or inf) with %s; redoing it in float32", part, where)

    def uses_vae_tiling(self, height: int, width: int, encode: bool = False) -> bool:
        """Whether a VAE decode (or encode) of a height x width image is tiled, as `vae_tiling`
        says: in "auto" mode, when its estimated peak exceeds the budget."""
        itemsize = next(self.vae.parameters()).element_size()
        estimate = (encode_bytes if encode else decode_bytes)(self.vae.config, height, width, itemsize)
        budget = self.vae_memory_budget
        return use_tiling(self.vae_tiling, estimate, available_memory(self.device) if budget is None else budget)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [-1, 1], one image at a time
        (VAE decoding memory grows fast with batch), tiled as `vae_tiling` says."""
        vae_dtype = next(self.vae.parameters()).dtype
        f = self.vae.config.downscale
        tiled = self.uses_vae_tiling(latents.shape[-2] * f, latents.shape[-1] * f)
        images = []
        for z in latents:
            z = z[None].to(self.device, vae_dtype)
            if tiled:
                images.append(decode_tiled(self.vae, z, self.vae_tile_size).float())
            else:
                images.append(self.vae.decode(z).float())
        return torch.cat(images)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> DiagonalGaussian:
        """The VAE posterior (over scaled latents) of images [B, 3, H, W] in [-1, 1], tiled as
        `vae_tiling` says."""
        images = images.to(self.device, next(self.vae.parameters()).dtype)
        if self.uses_vae_tiling(images.shape[-2], images.shape[-1], encode=True):
            return encode_tiled(self.vae, images, self.vae_tile_size)
        return self.vae.encode(images)

    @torch.no_grad()
    def sample_latents(
        self,
        params: GenerationParams,
        callback: ProgressCallback | None = None,
        preview: PreviewCallback | None = None,
        *,
        init_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the sampler; returns the final scaled latents [B, 4, h, w] in float32. The prompt's
        ``<lora:name:w>`` tags apply to this run only (`AddOns.prompt_addons`).

        With ``params.denoising_end`` the run stops there and the latents are those diffusers'
        scheduler holds at that point (``SamplingPlan.handoff_scale``), for a refiner to continue
        with ``denoising_start`` and these as ``init_latents`` (nothing is drawn for them)."""
        params = self.resolve_params(params).validate()
        with self.prompt_addons(params.prompt, params.negative_prompt) as prompt:
            return self._sample(replace(params, prompt=prompt), callback, preview, init_latents)

    def _sample(
        self,
        params: GenerationParams,
        callback: ProgressCallback | None,
        preview: PreviewCallback | None,
        init_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.spec.is_inpaint and params.mask is None:
            raise ValueError(f"{self.spec.name} is an inpainting model: pass init_image and mask")
        f = self.spec.vae.downscale
        latent_shape = (1, self.spec.vae.z_channels, params.height // f, params.width // f)
        if params.latents is not None and tuple(params.latents.shape[1:]) != latent_shape[1:]:
            raise ValueError(
                f"latents have shape {tuple(params.latents.shape)}, expected "
                f"({params.batch_size}, {', '.join(map(str, latent_shape[1:]))})"
            )

        if (init_latents is None) != (params.denoising_start is None):
            raise ValueError("denoising_start continues given latents: pass both it and init_latents, or neither")
        if init_latents is not None and tuple(init_latents.shape) != (params.batch_size, *latent_shape[1:]):
            raise ValueError(
                f"init_latents have shape {tuple(init_latents.shape)}, expected "
                f"({params.batch_size}, {', '.join(map(str, latent_shape[1:]))})"
            )
        conditioning = {}
        if self.spec.is_sdxl:
            c = self.encode_sdxl_prompt(params)
            cond, uncond = c.context, c.uncond_context
            ids, uncond_ids = self.sdxl_time_ids(params)
            conditioning = {
                "y": micro_conditioning(c.pooled, ids),
                "uncond_y": micro_conditioning(c.uncond_pooled, uncond_ids),
            }
        else:
            cond, uncond = self.encode_prompt(params.prompt, params.negative_prompt, params.clip_skip)
        # params.spacing: this generation's timestep spacing in place of the scheduler config's
        plan = sampling_plan(
            params.sampler, self.noise_schedule(), params.steps, params.schedule, spacing=params.spacing
        )
        denoiser = Denoiser(
            self.unet, plan.schedule, self.spec.prediction_type, sigma_to_t=plan.sigma_to_t, net_dtype=self.dtype
        )
        guided = CFGDenoiser(denoiser, params.guidance_scale, params.guidance_rescale)
        if params.denoising_start is not None:
            start = plan.start_at(params.denoising_start)
        else:
            start = 0 if params.init_image is None else plan.start_index(params.strength)
        end = plan.steps if params.denoising_end is None else plan.end_index(params.denoising_end)
        sigmas = plan.sigmas[start : end + 1]
        steps = len(sigmas) - 1
        if steps < 1:
            raise ValueError(
                f"denoising_start {params.denoising_start} / denoising_end {params.denoising_end} leave no step "
                f"of {params.steps}"
            )
        # a run stopped early hands its latents on in diffusers' frame; a whole run ends as diffusers' does
        out_scale = plan.output_scale if end == plan.steps else plan.handoff_scale(float(sigmas[-1]))
        total = steps * params.batch_size
        inputs = _Inputs(self, params, latent_shape)  # image, mask and their encodings: once per run
        together = self.batch_images if self.batch_images is not None else self.device.type == "cuda"
        groups = [range(params.batch_size)] if together else [range(k, k + 1) for k in range(params.batch_size)]
        results = []
        for group in groups:
            generators = [torch.Generator().manual_seed(params.seed + k) for k in group]
            starts = [
                _Start(
                    inputs,
                    plan,
                    sigmas,
                    g,
                    latent_shape,
                    None if params.latents is None else params.latents[k : k + 1],
                    self.device,
                    None if init_latents is None else init_latents[k : k + 1] / plan.handoff_scale(float(sigmas[0])),
                )
                for k, g in zip(group, generators, strict=True)
            ]
            n = len(group)
            extra = {"context": cond.expand(n, -1, -1), "uncond_context": uncond.expand(n, -1, -1)}
            extra.update((k, v.expand(n, -1)) for k, v in conditioning.items())
            if starts[0].concat is not None:
                extra["concat"] = torch.cat([s.concat for s in starts])
            blend = None
            if inputs.latent_mask is not None and not self.spec.is_inpaint:
                blend = InpaintDenoiser(
                    guided,
                    torch.cat([s.image_latents for s in starts]),
                    inputs.latent_mask,
                    torch.cat([s.noise for s in starts]),
                    first_sigma=float(sigmas[0]),
                )

            def on_step(info: dict, done: int = group[0] * steps, n: int = n) -> None:
                if preview is not None:
                    preview(info["denoised"])
                if callback is not None:
                    callback(done + (info["i"] + 1) * n, total)

            x = get_sampler(params.sampler)(
                plan.wrap_denoiser(blend or guided),
                torch.cat([s.x for s in starts]),
                sigmas,
                extra_args=extra,
                callback=on_step,
                generator=generators[0] if n == 1 else generators,
            )
            if blend is not None:
                x = blend.finalize(x, float(sigmas[-1]))
            results.append((x * out_scale).float())
        return torch.cat(results)


class _Inputs:
    """What every image of a run shares, prepared once: the init image's and the masked image's
    VAE posteriors and the latent-size mask (each image then draws its own samples)."""

    def __init__(self, pipe: StableDiffusion, params: GenerationParams, latent_shape: tuple[int, ...]):
        self.image_posterior = self.masked_posterior = self.latent_mask = None
        self.inpaint = params.mask is not None
        self.full_strength_inpaint = self.inpaint and params.strength >= 1.0
        if params.init_image is None:
            return
        device, encode = pipe.device, pipe.encode_image
        picture = load_image(params.init_image)
        image = image_to_tensor(resize_for_model(picture, params.width, params.height))
        # 9-channel models see the masked image through `concat`; they need the image's own latent
        # only to start from a partly noised image.
        if not (pipe.spec.is_inpaint and self.full_strength_inpaint):
            self.image_posterior = encode(image)
        if not self.inpaint:
            return
        mask_image = load_mask(params.mask)
        if mask_image.size != picture.size:
            raise ValueError(
                f"mask size {mask_image.width}x{mask_image.height} differs from the image size "
                f"{picture.width}x{picture.height}"
            )
        mask = mask_to_tensor(mask_image, params.width, params.height)  # [1, 1, H, W] in {0, 1}
        self.latent_mask = F.interpolate(mask, size=latent_shape[-2:]).to(device)
        if pipe.spec.is_inpaint:
            self.masked_posterior = encode(image * (mask < 0.5))


class _Start:
    """The initial latent of one image and what inpainting needs, with random numbers drawn from
    the image's generator in diffusers' order: the image's posterior sample, then the noise, then
    the masked image's posterior sample.

    txt2img starts from `noise * init_noise_sigma`; img2img from `image + noise * sigmas[0]`;
    inpainting from pure noise at strength 1 (as diffusers), else like img2img.
    """

    def __init__(
        self,
        inputs: _Inputs,
        plan,
        sigmas,
        generator: torch.Generator,
        latent_shape: tuple[int, ...],
        latents: torch.Tensor | None,
        device: torch.device,
        handoff: torch.Tensor | None = None,
    ):
        self.image_latents = self.concat = None
        self.latent_mask = inputs.latent_mask
        if handoff is not None:  # a base model's latents, continued as they are (diffusers draws nothing)
            self.x = self.noise = handoff.float().to(device)
            return
        if inputs.image_posterior is not None:
            self.image_latents = inputs.image_posterior.sample(generator).float()
        if latents is not None:
            self.noise = latents.float().to(device)
        else:
            self.noise = torch.randn(latent_shape, generator=generator).to(device)
        if self.image_latents is None or inputs.full_strength_inpaint:
            self.x = self.noise * plan.init_noise_sigma
        else:
            self.x = self.image_latents + self.noise * float(sigmas[0])
        if inputs.masked_posterior is not None:
            masked = inputs.masked_posterior.sample(generator).float()
            self.concat = torch.cat([self.latent_mask, masked], dim=1)
        elif inputs.inpaint:
            # diffusers encodes the masked image for every inpainting pipeline; a 4-channel model
            # does not use it, but drawing its noise keeps the generator in step with diffusers'.
            torch.randn(latent_shape, generator=generator)


class _NonFinite(Exception):
    """Raised from the sampler's callback to stop a half-precision sampling that overflowed."""


def _stop_when_non_finite(preview: PreviewCallback | None) -> PreviewCallback:
    """A preview callback that stops the sampling at the first NaN or inf in the step's x0 estimate
    (the latents themselves stay float32: a non-finite value can only come from the network), then
    passes the estimate on to ``preview``."""

    def watch(denoised: torch.Tensor) -> None:
        if not torch.isfinite(denoised).all():
            raise _NonFinite
        if preview is not None:
            preview(denoised)

    return watch


@contextlib.contextmanager
def _in_float32(*nets: torch.nn.Module) -> Iterator[None]:
    """The networks' float16/bfloat16 parameters and buffers in float32 within the block, then back
    in their dtype: bit-identical, since float32 holds every float16 and bfloat16 value. The same
    tensor objects throughout (hooks and references to them stay valid)."""
    saved: dict[int, tuple[torch.Tensor, torch.dtype]] = {}
    for net in nets:
        for t in (*net.parameters(), *net.buffers()):
            if t.dtype in _HALF and id(t) not in saved:
                saved[id(t)] = (t, t.dtype)
                t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in saved.values():
            t.data = t.data.to(dtype)
