"""The VAE stage: train an AutoencoderKL (Rombach et al. 2022, appendix G) on the run's images.

Loss per batch: reconstruction (L1 or L2, mean over pixels) + `kl_weight` * KL, with the KL
summed over latent elements and divided by the number of image elements. LDM sums both terms
over all elements; dividing both by the same count keeps its ratio, so `kl_weight` (1e-6) means
what it means there, while the loss stays O(1) for gradient clipping. Optionally, from step
`disc_start`, a patch discriminator (Isola et al. 2017) with hinge losses. As in LDM (after VQGAN,
Esser et al. 2021, eq. 7), the generator's adversarial term is weighted by `disc_weight` times an
adaptive factor, ||grad rec|| / ||grad adv|| at the decoder's last layer: a fixed weight lets the
adversarial gradient swamp the reconstruction once the latter gets small (held-out PSNR fell from
21.5 to 15.6 dB within 50 steps of turning a fixed 0.5 on). LPIPS is left out: it needs
pretrained VGG weights.

Both networks share one optimizer (`trainable()` is a ModuleDict "vae" + "disc"), so each loss
term is kept from the other network: the generator's adversarial term goes through the
discriminator with detached weights (`torch.func.functional_call`), and the discriminator's term
sees detached reconstructions.

Latents are trained unscaled (scaling_factor 1); `export` measures their std and writes
`scaling_factor = 1 / std` into the exported config, as LDM chose 0.18215 for SD.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from stablediff.image import tensor_to_images
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.train.config import TrainConfig
from stablediff.train.data.stage_data import image_text_data
from stablediff.train.distributed import rank_randn, unwrap
from stablediff.train.exports import VAE_PART, write_part
from stablediff.train.stage import Stage
from stablediff.weights.io import atomic_write_bytes

logger = logging.getLogger(__name__)

# Trained with scaling_factor 1 (unscaled latents); export replaces it by the measured 1 / std.
VAE_SIZES: dict[str, VAEConfig] = {
    # tests: f=2, ~0.3M parameters
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, scaling_factor=1.0),
    # the bundled model: f=4 (16x16x4 latents at 64 px), 0.95M parameters: flat-coloured shapes need
    # little capacity, and the package must stay small and fast on a CPU.
    "shapes-small": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=16, scaling_factor=1.0),
}


# ---------------------------------------------------------------------------------------------
# Networks
class PatchDiscriminator(nn.Module):
    """[B, 3, H, W] -> [B, 1, H/4 - 2, W/4 - 2] real/fake logits, one per ~34 px patch.

    A PatchGAN: two stride-2 and one stride-1 4x4 convolutions with LeakyReLU, GroupNorm (per
    sample, so real and fake may share a batch), and a 1-channel 4x4 head.
    """

    def __init__(self, in_channels: int = 3, ch: int = 64):
        super().__init__()
        groups = min(8, ch // 4)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ch, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1),
            nn.GroupNorm(groups, 2 * ch),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 4 * ch, 4, stride=1, padding=1),
            nn.GroupNorm(groups, 4 * ch),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * ch, 1, 4, stride=1, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AutoencoderTrainable(nn.ModuleDict):
    """{"vae": AutoencoderKL[, "disc": PatchDiscriminator]} with a forward that runs every network
    once, so DDP sees one forward per step. Returns tensors only:
    recon [B, 3, H, W], kl [B]; with a discriminator also logits_g (reconstructions through the
    detached discriminator) and logits_real / logits_fake (for the discriminator's own loss)."""

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        posterior = self["vae"].encode(images)
        # The trainer's step generator: this process's rows of the global batch's draw.
        noise = rank_randn(generator, posterior.mean.shape) if generator is not None else None
        recon = self["vae"].decode(posterior.sample(noise=noise))
        out = {"recon": recon, "kl": posterior.kl()}
        if "disc" in self:
            disc = self["disc"]
            frozen = {name: p.detach() for name, p in disc.named_parameters()}
            out["logits_g"] = functional_call(disc, frozen, (recon,))  # gradients reach the VAE only
            both = disc(torch.cat([images, recon.detach()]))  # gradients reach the discriminator only
            out["logits_real"], out["logits_fake"] = both.chunk(2)
        return out


def vae_config(name: str) -> VAEConfig:
    if name not in VAE_SIZES:
        raise ValueError(f"unknown VAE size {name!r}; choose one of {sorted(VAE_SIZES)}")
    return VAE_SIZES[name]


def foreground_mask(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 1, H, W] in {0, 1}: pixels farther than `threshold` (in any
    channel) from the median colour of the image's border, i.e. what stands out of the background."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > threshold).to(images.dtype)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): [B]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(4.0 / mse)


# ---------------------------------------------------------------------------------------------
# The stage
class VAEStage(Stage):
    name = "vae"

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        self.vae_config = vae_config(config.model)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global generator
            torch.manual_seed(config.seed)  # so every process builds the same initial weights
            modules = {"vae": AutoencoderKL(self.vae_config)}
            if config.disc_weight > 0:
                modules["disc"] = PatchDiscriminator(self.vae_config.in_channels, self.vae_config.ch)
        self.model = AutoencoderTrainable(modules).to(device)
        self._train, self._held = image_text_data(config)
        self._eval_images: torch.Tensor | None = None

    def trainable(self) -> nn.Module:
        return self.model

    def dataset(self) -> Dataset:
        return self._train

    def collate(self, items: list) -> torch.Tensor:
        """(image, caption) items -> images [B, 3, S, S]; captions are not used here."""
        return torch.stack([image for image, _ in items])

    def loss_terms(
        self, model: nn.Module, batch: torch.Tensor, step: int, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The weighted loss terms (their sum is the loss) and metrics. Terms: "rec", "kl", and with
        a discriminator "g_adv" (reaches the VAE only) and "d_hinge" (reaches the discriminator only)."""
        images = batch.to(self.device, non_blocking=True)
        out = model(images, generator)
        recon = out["recon"]
        diff = recon.float() - images.float()
        per_pixel = diff.abs() if self.config.recon_loss == "l1" else diff.pow(2)
        if self.config.recon_focus > 0:
            weight = 1.0 + self.config.recon_focus * foreground_mask(images.float())
            rec = (per_pixel * weight).sum() / (weight.sum() * per_pixel.shape[1])
        else:
            rec = per_pixel.mean()
        kl = out["kl"].float().mean() / images[0].numel()
        terms = {"rec": rec, "kl": self.config.kl_weight * kl}
        metrics = {
            "rec": rec.item(),
            "kl": out["kl"].float().mean().item(),
            "psnr": psnr(recon.detach().clamp(-1, 1), images).mean().item(),
        }
        if "logits_g" in out:
            # Before disc_start both terms are weighted 0 but still computed, so every parameter
            # takes part in every step (DDP needs no find_unused_parameters).
            factor = 1.0 if step >= self.config.disc_start else 0.0
            real, fake = out["logits_real"].float(), out["logits_fake"].float()
            d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())  # hinge
            g_loss = -out["logits_g"].float().mean()
            weight = self._adaptive_weight(model, rec, g_loss) if factor and torch.is_grad_enabled() else 0.0
            terms["g_adv"] = factor * self.config.disc_weight * weight * g_loss
            terms["d_hinge"] = factor * d_loss
            metrics |= {
                "g_loss": g_loss.item(),
                "d_loss": d_loss.item(),
                "adaptive_weight": float(weight),
                "logits_real": real.mean().item(),
                "logits_fake": fake.mean().item(),
            }
        return terms, metrics

    @staticmethod
    def _adaptive_weight(model: nn.Module, rec: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """||d rec / d W|| / ||d g_loss / d W|| for W the decoder's output conv, clamped to [0, 1e4],
        detached. torch.autograd.grad returns the gradients without accumulating them in .grad (so
        DDP's hooks do not fire), and it only backpropagates to that one layer."""
        last = unwrap(model)["vae"].decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def loss(
        self, model: nn.Module, batch: torch.Tensor, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        terms, metrics = self.loss_terms(model, batch, step, generator)
        total = sum(terms.values())
        metrics["loss"] = total.item()
        return total, metrics

    def _eval_batch(self) -> torch.Tensor:
        """The held-out images [N, 3, S, S] (CPU), loaded once."""
        if self._eval_images is None:  # at least one image, so sample() and export() work with eval_size 0
            n = max(1, min(self.config.eval_size, len(self._held)))
            self._eval_images = torch.stack([self._held[i][0] for i in range(n)])
        return self._eval_images

    @torch.no_grad()
    def _reconstruct(self, vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
        """Posterior-mean reconstructions in [-1, 1] (CPU), in batches of `batch_size`."""
        outs = []
        for chunk in images.split(self.config.batch_size):
            chunk = chunk.to(self.device)
            outs.append(vae.decode(vae.encode(chunk).mode()).clamp(-1, 1).float().cpu())
        return torch.cat(outs)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean PSNR (dB) of posterior-mean reconstructions of the held-out images ({} for eval_size 0)."""
        if self.config.eval_size < 1:
            return {}
        vae = unwrap(model)["vae"]
        was_training = vae.training
        vae.eval()
        try:
            images = self._eval_batch()
            return {"psnr": psnr(self._reconstruct(vae, images), images).mean().item()}
        finally:
            vae.train(was_training)

    def sample(self, model: nn.Module, path: Path) -> None:
        """A PNG: up to 8 held-out originals (top row) above their reconstructions."""
        vae = unwrap(model)["vae"]
        was_training = vae.training
        vae.eval()
        try:
            images = self._eval_batch()[:8]
            recon = self._reconstruct(vae, images)
        finally:
            vae.train(was_training)
        tiles = tensor_to_images(torch.cat([images, recon]))
        n, side = len(images), images.shape[-1]
        grid = Image.new("RGB", (n * side, 2 * side))
        for i, tile in enumerate(tiles):
            grid.paste(tile, ((i % n) * side, (i // n) * side))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())

    @torch.no_grad()
    def latent_std(self, vae: AutoencoderKL) -> float:
        """Std of unscaled posterior samples over the held-out images (seeded, all elements)."""
        generator = torch.Generator().manual_seed(self.config.seed)
        samples = []
        for chunk in self._eval_batch().split(self.config.batch_size):
            posterior = vae.encode(chunk.to(self.device))
            samples.append((posterior.sample(generator) / vae.config.scaling_factor).float().cpu())
        return torch.cat(samples).std().item()

    def export(self, model: nn.Module, out_dir: Path) -> Path:
        """`out_dir/vae.safetensors`: our key names, metadata {"stablediff.vae_config": JSON of the
        VAEConfig with the measured scaling_factor, "stablediff.latent_std": the std}."""
        vae = unwrap(model)["vae"]
        was_training = vae.training
        vae.eval()
        try:
            std = self.latent_std(vae)
        finally:
            vae.train(was_training)
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"cannot export the VAE: latent std is {std}")
        cfg = dataclasses.replace(vae.config, scaling_factor=1.0 / std)
        out = write_part(VAE_PART, vae, out_dir, config=cfg, metadata={"stablediff.latent_std": repr(std)})
        logger.info("VAE exported to %s (latent std %.4f -> scaling_factor %.5f)", out, std, cfg.scaling_factor)
        return out


__all__ = ["VAE_SIZES", "AutoencoderTrainable", "PatchDiscriminator", "VAEStage", "foreground_mask", "psnr"]
