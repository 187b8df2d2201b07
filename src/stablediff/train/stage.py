"""The contract between the trainer loop and what it trains.

The trainer (train/trainer.py) owns everything every stage shares: the optimizer and LR schedule,
gradient accumulation and clipping, mixed precision, EMA, data order and position, checkpoints and
resume, torch.distributed, metrics, plots and progress. A `Stage` owns what differs: its networks,
its data set, its loss, its held-out evaluation, its sample images, and the model it exports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from stablediff.train.config import TrainConfig


class Stage(ABC):
    """One trainable part of Stable Diffusion.

    Constructed once per process with the run's config and device; everything random inside is
    seeded from `config.seed` so that every process builds the same initial weights.
    """

    name: str = ""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = device

    @abstractmethod
    def trainable(self) -> nn.Module:
        """The module whose parameters are optimised, averaged by EMA, wrapped in DDP and saved
        in checkpoints (for several networks, an nn.ModuleDict of them). One optimizer serves all
        of it: a stage with an adversary (the VAE's patch discriminator) keeps each loss term from
        reaching the other network's parameters itself (detached inputs / detached weights)."""

    def lr_scales(self) -> dict[str, float]:
        """Parameter-name prefixes of `trainable()` that learn at a multiple of the run's lr (none by default)."""
        return {}

    @abstractmethod
    def dataset(self) -> Dataset:
        """The training set: items the stage's `collate` turns into a batch."""

    def collate(self, items: list[Any]) -> Any:
        """Items -> batch (default: torch's default collate)."""
        return torch.utils.data.default_collate(items)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(scalar loss to minimise, metrics to log as floats). `model` is `trainable()`, possibly
        DDP-wrapped: call it (or `model.module` attributes) rather than `self.trainable()`. All
        randomness (noise, timesteps, dropout masks) comes from `generator` so resume is exact.
        `generator` is the same on every process under torchrun: draw per-example randomness with
        `distributed.rank_rows`, so that each example's noise does not depend on the world size."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics (PSNR, retrieval accuracy, ...) for the EMA (or raw) model."""
        return {}

    def sample(self, model: nn.Module, path: Path) -> None:  # noqa: B027 - optional hook
        """Write a PNG grid showing what the model does now (rank 0 only)."""

    @abstractmethod
    def export(self, model: nn.Module, out_dir: Path) -> Path:
        """Write the finished part where later stages and `load_pipeline` can use it; return its path."""
