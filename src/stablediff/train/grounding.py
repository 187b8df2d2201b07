"""A grounding loss on cross-attention: each word that names an object attends inside its box.

TokenCompose (Wang et al., CVPR 2024, arXiv 2312.03626) fine-tunes Stable Diffusion with a token
loss beside the denoising loss: for a caption token that names an object, the share of its
cross-attention mass (over the pixels of a map; each pixel's attention is a softmax over the
tokens, here averaged over heads) that falls inside the object, ``L = (1 - share)^2``, averaged
over the grounded tokens and over the U-Net's cross-attention layers.

Regions say what a caption grounds: ``[start, end, x0, y0, x1, y1]`` means the characters
``caption[start:end]`` name what lies in the box from (x0, y0) to (x1, y1), in fractions of the
image side (y down). ``token_boxes`` turns them into a box per token of the tokenized caption;
``box_masks`` into each box's area coverage of a map's pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from stablediff.models.unet import CrossAttention
from stablediff.tokenizer import CLIPTokenizer


def item_regions(item: Sequence) -> list | None:
    """The grounding regions a dataset item ``(x, caption, ...)`` carries: its third element when that
    is a list (others, such as a shapes ``Scene``, are not regions), else None."""
    return item[2] if len(item) > 2 and isinstance(item[2], list) else None


def token_boxes(
    tokenizer: CLIPTokenizer, caption: str, regions: Sequence[Sequence[float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes [L, 4] float32, grounded [L] bool) over the ``tokenizer(caption)`` positions (L its
    ``max_length``): the box of each token inside a region's characters. A region must start and
    end on word boundaries; tokens cut off by the length limit are not grounded."""
    length = tokenizer.max_length
    boxes, grounded = torch.zeros(length, 4), torch.zeros(length, dtype=torch.bool)
    ids = tokenizer.encode(caption)
    for region in regions:
        if len(region) != 6:
            raise ValueError(f"a region is [start, end, x0, y0, x1, y1], got {list(region)!r}")
        start, end, *box = region
        start, end = int(start), int(end)
        if not 0 <= start < end <= len(caption):
            raise ValueError(f"region [{start}, {end}) is outside the caption {caption!r} ({len(caption)} characters)")
        first, upto = len(tokenizer.encode(caption[:start])), tokenizer.encode(caption[:end])
        last = len(upto)
        if ids[:last] != upto or last == first:
            raise ValueError(f"region [{start}, {end}) of {caption!r} does not fall on word boundaries")
        positions = range(1 + first, min(1 + last, length - 1))  # after BOS, before the final EOS slot
        boxes[positions.start : positions.stop] = torch.tensor(box, dtype=torch.float32)
        grounded[positions.start : positions.stop] = True
    return boxes, grounded


def _coverage(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n]: how much of each of n equal cells of [0, 1] the interval [lo, hi] covers (0..1)."""
    edges = torch.arange(n + 1, dtype=lo.dtype, device=lo.device) / n
    overlap = torch.minimum(hi[..., None], edges[1:]) - torch.maximum(lo[..., None], edges[:-1])
    return overlap.clamp_min(0) * n


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., height * width]: the area of each pixel of a height x width map that ``boxes`` [..., 4]
    (x0, y0, x1, y1 in fractions of the side) cover, row-major like a flattened feature map."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    rows, cols = _coverage(y0, y1, height), _coverage(x0, x1, width)
    return (rows[..., :, None] * cols[..., None, :]).flatten(-2)


@contextmanager
def cross_attention_maps(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the maps [B, pixels, tokens] of every cross-attention layer of ``model`` (layers
    attending to a text context) run inside the block, in call order."""
    layers = [m for name, m in model.named_modules() if isinstance(m, CrossAttention) and name.endswith("attn2")]
    maps: list[torch.Tensor] = []
    for layer in layers:
        layer.maps = maps
    try:
        yield maps
    finally:
        for layer in layers:
            layer.maps = None


def grounding_loss(
    maps: Sequence[torch.Tensor], boxes: torch.Tensor, grounded: torch.Tensor, latent_size: tuple[int, int]
) -> torch.Tensor:
    """Per-sample token loss [B]: mean over maps and grounded tokens of (1 - share of the token's
    attention inside its box)^2; 0 for a sample without grounded tokens. ``maps``: [B, h*w, L]
    from ``cross_attention_maps``, each map a downsampling of the ``latent_size`` (H, W) grid."""
    if not maps:
        raise ValueError("no cross-attention maps were recorded: the model has no cross-attention layers")
    height, width = latent_size
    grounded = grounded.to(maps[0].device)
    weight = grounded.float() / grounded.sum(-1, keepdim=True).clamp_min(1)  # [B, L]
    losses, masks_at = [], {}
    for attention in maps:
        pixels = attention.shape[1]
        scale = round((height * width / pixels) ** 0.5)
        h, w = -(-height // scale), -(-width // scale)  # each level halves the side, rounding up
        if h * w != pixels:
            raise ValueError(f"a {pixels}-pixel attention map is no downsampling of a {height}x{width} latent")
        if (h, w) not in masks_at:  # several layers share a resolution
            masks_at[h, w] = box_masks(boxes.to(attention.device), h, w)  # [B, L, h*w]
        masks = masks_at[h, w]
        per_token = attention.float().transpose(1, 2)  # [B, L, h*w]
        share = (per_token * masks).sum(-1) / per_token.sum(-1).clamp_min(1e-8)
        losses.append(((1 - share) ** 2 * weight).sum(-1))
    return torch.stack(losses).mean(0)


__all__ = ["box_masks", "cross_attention_maps", "grounding_loss", "item_regions", "token_boxes"]
