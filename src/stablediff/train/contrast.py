"""The relation contrast: a denoising model that uses a caption's relation fits a noisy latent
better with the true caption than with the relation turned round. Its gain from doing so is a
sliver of the plain denoising loss (docs/model-card.md, "Why two-object relations fail"), so the
term asks for it directly, in the spirit of Diffusion-DPO (Wallace et al. 2024) and of diffusion
models read as classifiers (Li et al. 2023): a logistic loss on the log ratio of the two errors,
which is the same at every noise level whatever the errors' scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relation_contrast_loss(true_errors: torch.Tensor, inverse_errors: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-sample loss [N]: softplus(-log(inverse_errors / true_errors) / scale), log 2 where the
    two captions fit equally well, towards 0 once the inverse caption's error is clearly larger.
    `scale`: the log ratio that counts as clearly (0.02: errors 2% apart)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    margin = torch.log(inverse_errors.clamp_min(1e-12)) - torch.log(true_errors.clamp_min(1e-12))
    return F.softplus(-margin / scale)


__all__ = ["relation_contrast_loss"]
