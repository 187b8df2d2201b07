"""SDXL's conditioning in the U-Net stages (finetune, lora): what the U-Net is given for a batch.

SDXL (Podell et al. 2023) conditions its U-Net on two text encoders and on each image's geometry:

- ``context``: CLIP ViT-L's and OpenCLIP bigG's penultimate hidden states, concatenated along the
  width (2048 wide for the real model), each encoder reading the caption with its own tokenizer;
- ``y``: bigG's projected pooled embedding followed by the sinusoidal embedding of six numbers,
  the image's original size (height, width) before resizing, the top-left corner (top, left) of
  its crop, and the target size (height, width) it is trained at (`models.unet.micro_conditioning`);
  section 2.2 of the paper, as kohya's ``sdxl_train`` and diffusers' ``train_text_to_image_sdxl``
  compute them.

A dropped caption is "" for both encoders (the data set empties the one caption both read), as in
those scripts. The encodings are exactly those the pipeline makes for a prompt of one chunk, so a
model trained here is sampled as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import micro_conditioning, sdxl_time_ids
from stablediff.tokenizer import CLIPTokenizer
from stablediff.train.data.folder import item_geometry

__all__ = ["SDXLText", "batch_time_ids"]

# The token ids and micro-conditioning numbers of a batch, the inputs of `SDXLText`.
INPUTS = ("ids", "ids_2", "time_ids")


def batch_time_ids(items: Sequence[Sequence]) -> torch.Tensor:
    """The micro-conditioning numbers [B, 6] of image items ``(image [3, H, W], caption, ...)``:
    each item's `ImageGeometry` when it carries one, else (an image drawn at its size, like the
    shapes data) its own size as original size and a crop at (0, 0); the target is (H, W)."""
    rows = []
    for item in items:
        target = tuple(item[0].shape[-2:])
        geometry = item_geometry(item)
        original, crop = (target, (0, 0)) if geometry is None else geometry
        rows.append(sdxl_time_ids(original, crop, target))
    return torch.stack(rows)


class SDXLText:
    """SDXL base's two frozen (or LoRA-hooked) text encoders and tokenizers, as one conditioner:
    ``tokenize`` makes a batch's inputs, ``__call__`` turns them into the U-Net's keyword arguments.
    Not a module: the networks belong to the base model and are never trained or saved through it."""

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
    ):
        if text_encoder_2.config.projection_dim is None:
            raise ValueError("SDXL's second text encoder must have a text projection (its pooled output conditions y)")
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"ids", "ids_2"}: [B, 77] int64 from each tokenizer (the second pads with its own token)."""
        return {
            "ids": torch.tensor(self.tokenizer(captions), dtype=torch.long),
            "ids_2": torch.tensor(self.tokenizer_2(captions), dtype=torch.long),
        }

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"context": [B, 77, D1 + D2], "y": [B, P + 6 * 256]} from {"ids", "ids_2", "time_ids"}:
        each encoder at its own (config) layer, as the pipeline encodes a one-chunk prompt."""
        context = self.text_encoder(inputs["ids"])
        context_2, pooled = self.text_encoder_2.encode_pooled(inputs["ids_2"])
        return {
            "context": torch.cat([context, context_2], dim=-1),
            "y": micro_conditioning(pooled, inputs["time_ids"]),
        }
