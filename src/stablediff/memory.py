"""How much memory a generation will need, estimated before anything is loaded (docs/memory.md).

`estimate_generation` adds the weights of the networks (counted on the meta device, in the dtype
they will run in: SDXL's second text tower too, and an SDXL refiner's networks when one takes over)
to the largest of the stages' activations: the text encoder(s), the U-Net
(batch rows at latent resolution: its skip connections and the widest transformer's working
set), the VAE encode of an init image and the VAE decode, with the tiling choice the pipeline
will make (`stablediff.tiling`), plus the runtime's own memory and the allocator's slack (fitted to
measured peaks). `check_fits` turns an estimate above the available memory into
a ValueError that says what to change. Compared with measured peaks in docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetConfig, UNetModel
from stablediff.models.vae import AutoencoderKL
from stablediff.params import GenerationParams
from stablediff.presets import ModelSpec
from stablediff.tiling import DEFAULT_TILE, available_memory, decode_bytes, encode_bytes, use_tiling

GIB = 1024**3
# What the networks' sizes do not show, fitted to the peaks measured in docs/benchmarks.md (SD 1.5,
# 256-768 px): torch's libraries and kernel caches (0.2 GiB at import, more after a first run), and
# earlier stages' freed activations that the allocator keeps (the sum alone was 5-13% low).
RUNTIME_BYTES = GIB // 2
ACTIVATION_SLACK = 0.1


def weight_bytes(spec: ModelSpec, itemsize: int) -> int:
    """Bytes of the networks' parameters and buffers with floating values of ``itemsize``: the
    U-Net, the VAE and the text encoder (and SDXL base's second one)."""
    texts = (spec.text,) if spec.text_2 is None else (spec.text, spec.text_2)
    with torch.device("meta"):
        nets = (UNetModel(spec.unet), AutoencoderKL(spec.vae), *(CLIPTextModel(t) for t in texts))
    return sum(t.numel() * itemsize for net in nets for t in (*net.parameters(), *net.buffers()))


def text_bytes(spec: ModelSpec, rows: int, itemsize: int) -> int:
    """Activations of the text encoding: the widest tower's MLP on ~3 chunks of 77 tokens (SDXL's
    towers run one after the other)."""
    texts = (spec.text,) if spec.text_2 is None else (spec.text, spec.text_2)
    return max(rows * 77 * 3 * t.width * t.mlp_ratio * itemsize for t in texts)


def unet_bytes(cfg: UNetConfig, h: int, w: int, rows: int, itemsize: int) -> int:
    """Peak activations of one U-Net call on ``rows`` latents of h x w: the skip connections held
    for the decoder half plus the largest working set, a transformer's (about 20 maps of its
    width: attention projections and the GEGLU's 8x-wide hidden layer; the fused attention kernels
    hold no score matrix) or a res block's on concatenated input (about 6 maps)."""
    res, skips, working = h * w, cfg.model_channels * h * w, 0
    for level, mult in enumerate(cfg.channel_mult):
        ch = cfg.model_channels * mult
        skips += cfg.num_res_blocks * ch * res + (ch * res // 4 if level < len(cfg.channel_mult) - 1 else 0)
        working = max(working, (20 if level in cfg.attention_levels else 6) * ch * res)
        res //= 4
    return rows * itemsize * (skips + working)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: the weights, and each stage's activations; `peak` = weights + the largest stage + the
    runtime's overhead."""

    weights: int
    # "text encoder", "U-Net", "VAE encode" (img2img), "VAE decode"; with a refiner also
    # "refiner text encoder" and "refiner U-Net"
    stages: dict[str, int]
    tiled: dict[str, bool]  # "VAE encode", "VAE decode": whether the pass will be tiled
    itemsize: int  # bytes per weight
    available: int | None  # on the device, when known

    @property
    def overhead(self) -> int:
        """The runtime's own memory and the allocator's slack on the largest stage."""
        return RUNTIME_BYTES + int(ACTIVATION_SLACK * max(self.stages.values()))

    @property
    def peak(self) -> int:
        return self.weights + max(self.stages.values()) + self.overhead

    def lines(self) -> list[str]:
        """The report `stablediff generate --dry-run` prints."""
        rows = [("weights", self.weights)]
        for name, size in self.stages.items():
            label = f"{name} ({'tiled' if self.tiled[name] else 'untiled'})" if name in self.tiled else name
            rows.append((f"{label} activations", size))
        rows.append(("runtime and allocator slack", self.overhead))
        rows.append(("estimated peak", self.peak))
        text = [f"{label + ':':<34}{size / GIB:8.2f} GiB" for label, size in rows]
        free = "unknown" if self.available is None else f"{self.available / GIB:8.2f} GiB"
        return [*text, f"{'available:':<34}{free}"]


def estimate_generation(
    spec: ModelSpec,
    params: GenerationParams,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    vae_tiling: str = "auto",
    tile: int = DEFAULT_TILE,
    available: int | None = None,
    batch_images: bool | None = None,
    refiner: ModelSpec | None = None,
) -> MemoryEstimate:
    """The memory `StableDiffusion.generate(params)` will need on ``device`` with weights in
    ``dtype``. ``available``: bytes free (default: measured now). In "auto" mode a VAE pass is
    counted tiled when its untiled peak would not fit beside the weights, as the pipeline will
    decide then. ``batch_images`` as the pipeline's (None: together on CUDA devices only).
    ``refiner``: an SDXL refiner loaded beside the model that continues its latents (the command
    line's ``--refiner``): its weights count too, and its text encoder and U-Net are stages; the
    refiner decodes, with its own VAE."""
    params = params.with_default_size(spec.default_size)
    device = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    available = available_memory(device) if available is None else available
    weights = weight_bytes(spec, itemsize) + (0 if refiner is None else weight_bytes(refiner, itemsize))
    together = batch_images if batch_images is not None else device.type == "cuda"
    rows = (2 if params.guidance_scale > 1 else 1) * (params.batch_size if together else 1)
    f = spec.vae.downscale
    stages = {
        "text encoder": text_bytes(spec, rows, itemsize),
        "U-Net": unet_bytes(spec.unet, params.height // f, params.width // f, rows, itemsize),
    }
    if refiner is not None:
        stages["refiner text encoder"] = text_bytes(refiner, rows, itemsize)
        stages["refiner U-Net"] = unet_bytes(refiner.unet, params.height // f, params.width // f, rows, itemsize)
    tiled = {}
    passes = (("VAE encode", encode_bytes, spec.vae),) if params.init_image is not None else ()
    for name, estimate, vae in (*passes, ("VAE decode", decode_bytes, (refiner or spec).vae)):
        untiled = estimate(vae, params.height, params.width, itemsize)
        tiled[name] = use_tiling(vae_tiling, untiled, None if available is None else available - weights)
        stages[name] = estimate(vae, params.height, params.width, itemsize, tile) if tiled[name] else untiled
    return MemoryEstimate(weights, stages, tiled, itemsize, available)


def check_fits(estimate: MemoryEstimate, loaded: bool = False) -> None:
    """A ValueError naming the estimate, the available memory and what to change when the run
    would not fit (``loaded``: the weights are in memory already and not counted again)."""
    need = estimate.peak - (estimate.weights if loaded else 0)
    if estimate.available is None or need <= estimate.available:
        return
    largest = max(estimate.stages, key=estimate.stages.get)
    advice = ["a smaller width and height (or batch)"]
    if not all(estimate.tiled.values()):
        advice.append("--vae-tiling always")
    if estimate.itemsize > 2:
        advice.append("--dtype bf16")
    raise ValueError(
        f"this run needs an estimated {need / GIB:.2f} GiB of memory (weights {estimate.weights / GIB:.2f} GiB, "
        f"then the {largest} {estimate.stages[largest] / GIB:.2f} GiB) but {estimate.available / GIB:.2f} GiB "
        f"is available; try {', '.join(advice)}; --dry-run prints the estimate"
    )
