"""Latent caches: encode a dataset with the VAE once, then train the U-Net on the stored posteriors.

The cache is one safetensors file with two tensors, ``mean`` and ``std`` (``[N, z, h, w]``
float32, over *scaled* latents, exactly what ``AutoencoderKL.encode`` returns), and metadata
(string values, JSON where structured): ``format`` = "stablediff.latent_cache", ``version``,
``count``, ``captions`` (a JSON list of N strings), ``image_size`` ([H, W]), ``vae_config`` and,
when the dataset's items carry them, ``regions`` (a JSON list of N lists of grounding regions
``[start, end, x0, y0, x1, y1]``, see :mod:`stablediff.train.grounding`).
Storing the posterior rather than one sample lets every epoch draw a fresh latent
``mean + std * eps``, as training on the images themselves would.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from stablediff.image import image_to_tensor
from stablediff.seeds import derive_seed
from stablediff.train.grounding import item_regions
from stablediff.weights.io import read_metadata, read_state_dict, write_safetensors

CACHE_FORMAT = "stablediff.latent_cache"
CACHE_VERSION = "1"


def _image_tensor(item: Any, index: int) -> torch.Tensor:
    """A dataset item's image as ``[3, H, W]`` float in [-1, 1] (PIL images are converted)."""
    if isinstance(item, Image.Image):
        return image_to_tensor(item)[0]
    if isinstance(item, torch.Tensor) and item.ndim == 3 and item.shape[0] == 3:
        return item
    got = list(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
    raise TypeError(f"item {index}: expected a [3, H, W] tensor or a PIL image, got {got}")


@torch.no_grad()
def encode_latent_cache(
    dataset: Sequence[Any],
    vae: nn.Module,
    out_path: str | os.PathLike[str],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    prefix: str | os.PathLike[str] | None = None,
) -> Path:
    """Encode every item of ``dataset`` (``ds[i] -> (image, caption, ...)``, image ``[3, H, W]`` in
    [-1, 1] or a PIL image, all of one size) with ``vae`` and write the cache to ``out_path``;
    grounding regions (a list as third element, ``item_regions``), when item 0 has them, are
    stored for every item.

    The dataset must not drop captions (``caption_dropout`` > 0 is refused): dropout belongs to
    ``LatentCacheDataset``, per epoch. Random crops or flips of the dataset are baked in once.
    ``vae`` runs in eval mode on ``device`` in its own dtype; its mode is restored afterwards.
    ``prefix``: an existing cache made with the same VAE whose items come first, copied rather
    than encoded again (a larger cache that extends a smaller one).
    The file is written atomically at the end; a failed call writes nothing. Returns the path.
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ValueError(f"cannot write latent cache {out_path}: folder {out_path.parent} does not exist")
    if getattr(dataset, "caption_dropout", 0.0):
        raise ValueError("encode a dataset with caption_dropout=0.0; LatentCacheDataset applies the dropout")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot encode an empty dataset")
    dtype = next(vae.parameters()).dtype
    config = getattr(vae, "config", None)
    vae_config = json.dumps(config.to_dict() if hasattr(config, "to_dict") else None)
    means, stds, captions, regions = [], [], [], []
    image_size: tuple[int, ...] | None = None
    done = 0
    if prefix is not None:
        first = LatentCacheDataset(prefix)
        if first.metadata.get("vae_config") != vae_config:
            raise ValueError(f"prefix cache {prefix} was encoded with another VAE configuration than this VAE's")
        means.append(first.mean)
        stds.append(first.std)
        captions += first.captions
        stored = first.metadata.get("regions")
        regions += json.loads(stored) if stored is not None else [None] * len(first)
        image_size = tuple(json.loads(first.metadata["image_size"]))
        done = len(first)
    was_training = vae.training
    vae.eval()
    try:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            images = [_image_tensor(item[0], start + k) for k, item in enumerate(items)]
            for k, image in enumerate(images):
                if image_size is None:
                    image_size = tuple(image.shape[1:])
                if tuple(image.shape[1:]) != image_size:
                    raise ValueError(
                        f"item {start + k} is {list(image.shape[1:])}, expected {list(image_size)} "
                        "like item 0: a cache holds one image size"
                    )
            posterior = vae.encode(torch.stack(images).to(device=device, dtype=dtype))
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            captions += [str(item[1]) for item in items]
            regions += [item_regions(item) for item in items]
            if progress is not None:
                progress(start + len(items), n)
    finally:
        vae.train(was_training)
    metadata = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "count": str(done + n),
        "captions": json.dumps(captions, ensure_ascii=False),
        "image_size": json.dumps(list(image_size or ())),
        "vae_config": vae_config,
    }
    if any(r is not None for r in regions):
        missing = next((i for i, r in enumerate(regions) if r is None), None)
        if missing is not None:
            raise ValueError(
                f"item {missing} (the prefix's {done} items first) has no grounding regions but others have: "
                "all items or none"
            )
        metadata["regions"] = json.dumps(regions)
    write_safetensors({"mean": torch.cat(means), "std": torch.cat(stds)}, out_path, metadata)
    return out_path


class LatentCacheDataset:
    """A latent cache as a map-style dataset: ``ds[i] -> (latent [z, h, w] float32, caption)``, or
    with ``regions=True`` ``(latent, caption, grounding regions)`` (the cache must store them).

    ``latent = mean + std * eps`` with ``eps`` from a CPU generator seeded by ``(seed, epoch, i)``
    (``sample=False``: the mean); the caption is "" with probability ``caption_dropout``, drawn
    from the same seed. ``set_epoch`` gives fresh draws for a new epoch.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        caption_dropout: float = 0.0,
        seed: int = 0,
        sample: bool = True,
        regions: bool = False,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"latent cache {self.path} does not exist")
        self.metadata = read_metadata(self.path)
        if self.metadata.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{self.path} is not a latent cache (format {self.metadata.get('format')!r}, expected {CACHE_FORMAT!r})"
            )
        tensors = read_state_dict(self.path)
        self.mean, self.std = tensors["mean"], tensors["std"]
        self.captions: list[str] = json.loads(self.metadata["captions"])
        if self.mean.shape != self.std.shape or len(self.captions) != self.mean.shape[0]:
            raise ValueError(
                f"latent cache {self.path} is inconsistent: mean {list(self.mean.shape)}, "
                f"std {list(self.std.shape)}, {len(self.captions)} captions"
            )
        self.regions: list[list[list[float]]] | None = None
        if regions:
            if "regions" not in self.metadata:
                raise ValueError(
                    f"latent cache {self.path} stores no grounding regions (encode a dataset whose "
                    "items carry them, e.g. the shapes recipe's cache)"
                )
            self.regions = json.loads(self.metadata["regions"])
            if len(self.regions) != len(self.captions):
                raise ValueError(
                    f"latent cache {self.path}: {len(self.regions)} region lists for {len(self.captions)} captions"
                )
        self.caption_dropout, self.seed, self.sample = caption_dropout, seed, sample
        self.epoch = 0

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        seed = derive_seed(self.seed, self.epoch, index)
        latent = self.mean[index].clone()  # a copy: callers may modify it in place
        if self.sample:
            generator = torch.Generator().manual_seed(seed)
            latent = latent + self.std[index] * torch.randn(latent.shape, generator=generator)
        # A separate stream for the dropout, so sample=False keeps the same captions.
        dropped = random.Random(seed).random() < self.caption_dropout
        text = "" if dropped else self.captions[index]
        if self.regions is None:
            return latent, text
        return latent, text, [] if dropped else self.regions[index]
