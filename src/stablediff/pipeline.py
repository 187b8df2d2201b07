"""The StableDiffusion object: the three networks, the tokenizer and the spec that ties them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetModel
from stablediff.models.vae import AutoencoderKL
from stablediff.presets import ModelSpec
from stablediff.tokenizer import CLIPTokenizer


@dataclass
class StableDiffusion:
    """A loaded model. Build one with `stablediff.load_pipeline`."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    spec: ModelSpec

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for net in (self.unet, self.vae, self.text_encoder):
            net.to(device=device, dtype=dtype)
        return self

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Our-named weights of the three networks: {"unet", "vae", "text"}."""
        return {"unet": self.unet.state_dict(), "vae": self.vae.state_dict(), "text": self.text_encoder.state_dict()}
