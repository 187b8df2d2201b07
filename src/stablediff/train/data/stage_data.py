"""What each training stage trains on, from `TrainConfig.data`: "shapes" (drawn on the fly), a
captioned folder, or a latent cache; the held-out part of it; and the caption corpus of the
tokenizer stage.

- image stages (vae, text): `image_text_data` -> (training set, held-out set) of (image, caption);
- U-Net stages: `unet_data` -> the same for images or cached latents, with caption dropout;
- tokenizer: `caption_corpus` -> every caption, without reading an image.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from stablediff.image import image_to_tensor
from stablediff.models.vae import AutoencoderKL
from stablediff.seeds import derive_seed
from stablediff.shapes import ShapesDataset, caption_regions, shapes_captions
from stablediff.train.config import TrainConfig
from stablediff.train.data.buckets import bucket_shapes
from stablediff.train.data.folder import CaptionedFolder, item_geometry
from stablediff.train.data.latent_cache import LatentCacheDataset
from stablediff.train.grounding import item_regions
from stablediff.train.order import set_epoch
from stablediff.weights.io import read_metadata

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003  # held-out shapes come from another seed than the training stream


class ShapesPairs(Dataset):
    """`ShapesDataset` items as (image [3, S, S] in [-1, 1], caption): what `CaptionedFolder` gives;
    with `regions`, (image, caption, the caption's grounding regions: `caption_regions`).
    `n_objects`: 1, 2 or None (either)."""

    def __init__(
        self, n: int, seed: int, size: int, split: str = "train", regions: bool = False, n_objects: int | None = None
    ):
        self.shapes, self.regions = ShapesDataset(n, seed, split, size, n_objects=n_objects), regions

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, text, scene = self.shapes[index]
        if not self.regions:
            return image_to_tensor(image)[0], text
        regions = caption_regions(text, scene, self.shapes.placements(index), self.shapes.size)
        return image_to_tensor(image)[0], text, regions


def image_text_data(config: TrainConfig, regions: bool = False, geometry: bool = False) -> tuple[Dataset, Dataset]:
    """(training set, held-out set) of (image, caption) pairs for `config.data`; `regions`: shapes
    training items carry their grounding regions too (a latent cache stores them); `geometry`: a
    folder's items carry their `ImageGeometry` too (SDXL's micro-conditioning).

    "shapes": an endless-looking stream of `shapes_size` scenes, and `eval_size` scenes of another
    seed. A folder: `hold_out`, the held-out items read with a centre crop and no flip.
    """
    if config.data == "shapes":
        train = ShapesPairs(config.shapes_size, config.seed, config.resolution, regions=regions)
        held = ShapesPairs(max(config.eval_size, 1), config.seed + EVAL_SEED_OFFSET, config.resolution)
        return train, held
    if not config.data or config.data.endswith(".safetensors"):
        raise ValueError(f"--data must be 'shapes' or a captioned image folder for this stage, got {config.data!r}")
    folder = CaptionedFolder(
        config.data,
        config.resolution,
        crop="center" if config.center_crop else "random",
        flip=config.flip,
        seed=config.seed,
        strict=config.strict,
        buckets=bucket_shapes(config.resolution, config.bucket_step, config.bucket_max_aspect)
        if config.buckets
        else None,
        geometry=geometry,
    )
    plain = copy.copy(folder)  # the same verified items, read without augmentation (square centre crops)
    plain.crop, plain.flip, plain.item_buckets = "center", False, None
    return hold_out(folder, plain, config)


def hold_out(data: Dataset, plain: Dataset, config: TrainConfig) -> tuple[Dataset, Dataset]:
    """(training items of `data`, held-out items of `plain`, its unaugmented view): a subset of
    `eval_size` items (at most a tenth), chosen by `config.seed`, is held out of training; a data
    set too small for that is evaluated on training items (logged)."""
    n_eval = min(config.eval_size, len(data) // 10)
    if n_eval == 0:
        logger.warning(
            "%s: %d items are too few to hold some out; evaluating on training items", config.data, len(data)
        )
        return data, Subset(plain, range(min(config.eval_size, len(data))))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed)).tolist()
    return Subset(data, sorted(order[n_eval:])), Subset(plain, sorted(order[:n_eval]))


class CaptionDropout(Dataset):
    """(x, caption[, regions][, geometry]) items with the caption replaced by "" with probability `p`,
    drawn from a generator seeded by (seed, epoch, index): classifier-free guidance needs the
    unconditional case. Grounding regions and an `ImageGeometry` are kept (anything else after the
    caption is not); SDXL's two text encoders both read the one caption, so both lose it."""

    def __init__(self, dataset: Dataset, p: float, seed: int):
        self.dataset, self.p, self.seed, self.epoch = dataset, p, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_epoch(self.dataset, epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        (x, text), regions, geometry = item[:2], item_regions(item), item_geometry(item)
        if random.Random(derive_seed(self.seed, "caption-dropout", self.epoch, index)).random() < self.p:
            text, regions = "", [] if regions is not None else None  # an empty caption grounds nothing
        return (x, text, *(extra for extra in (regions, geometry) if extra is not None))


def captions_of(dataset: Any) -> list[str]:
    """The captions of a data set without reading its images, where it can say them; else []."""
    if isinstance(dataset, Subset):
        inner = captions_of(dataset.dataset)
        return [inner[i] for i in dataset.indices] if inner else []
    if hasattr(dataset, "captions"):
        return list(dataset.captions)
    if hasattr(dataset, "items"):
        return [text for _, text in dataset.items]
    return []


def latent_data(config: TrainConfig, vae: AutoencoderKL) -> tuple[Dataset, Dataset]:
    cache = LatentCacheDataset(config.data, caption_dropout=0.0, seed=config.seed, regions=config.grounding_weight > 0)
    stored = cache.metadata.get("vae_config")
    if stored and json.loads(stored) not in (None, json.loads(json.dumps(vae.config.to_dict()))):
        raise ValueError(
            f"latent cache {config.data} was encoded with another VAE than this run's "
            f"(cache: {stored}; run: {vae.config.to_dict()})"
        )
    if cache.latent_shape[0] != vae.config.z_channels:
        raise ValueError(
            f"latent cache {config.data} has {cache.latent_shape[0]} latent channels, the VAE {vae.config.z_channels}"
        )
    plain = copy.copy(cache)
    plain.sample = False  # evaluate on posterior means: the same numbers every time
    plain.regions = None  # the held-out loss is the denoising loss: no token boxes to build
    return hold_out(cache, plain, config)


def unet_data(config: TrainConfig, vae: AutoencoderKL, geometry: bool = False) -> tuple[Dataset, Dataset, bool]:
    """(training set with caption dropout, held-out set, whether items are latents). `geometry`
    (SDXL): folder items carry their original size and crop (`ImageGeometry`); a latent cache, which
    keeps neither, is refused."""
    if not config.data:
        raise ValueError("--data is required: a captioned image folder, a latent cache (.safetensors) or 'shapes'")
    path = Path(config.data)
    if config.data != "shapes" and not path.exists():
        raise ValueError(
            f"training data {config.data!r} does not exist (expected a captioned image folder, "
            "a latent cache file or 'shapes')"
        )
    latents = path.is_file()
    if geometry and latents:
        raise ValueError(
            f"an SDXL model is conditioned on each image's original size and crop, which the latent cache "
            f"{config.data!r} does not keep: train on the captioned image folder itself"
        )
    if config.buckets and (latents or config.data == "shapes"):
        raise ValueError(
            f"buckets needs a captioned image folder as --data (images of many aspect ratios); {config.data!r} "
            "has one image size"
        )
    if config.grounding_weight and not latents and config.data != "shapes":
        raise ValueError(
            f"grounding_weight needs captions with grounding regions: --data shapes or a latent cache "
            f"that stores them; the captioned folder {config.data!r} has none"
        )
    train, held = (
        latent_data(config, vae) if latents else image_text_data(config, config.grounding_weight > 0, geometry)
    )
    if len(train) == 0:
        raise ValueError(f"training data {config.data!r} is empty")
    return CaptionDropout(train, config.caption_dropout, config.seed), held, latents


def caption_corpus(config: TrainConfig) -> list[str]:
    """Every caption of `config.data`, in dataset order: for "shapes" those of
    `ShapesDataset(shapes_size, seed)`, made without rendering an image; for a latent cache those
    stored in its metadata; for a captioned folder those of exactly the items `CaptionedFolder`
    trains on (unreadable images are skipped there and here alike)."""
    data = config.data
    if not data:
        raise ValueError("the tokenizer stage needs --data: a captioned folder, a latent cache or 'shapes'")
    if data == "shapes":
        return list(shapes_captions(config.shapes_size, config.seed))
    path = Path(data)
    if path.is_file() and path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "captions" not in meta:
            raise ValueError(f"{path} has no 'captions' metadata: not a latent cache")
        return list(json.loads(meta["captions"]))
    # verify="header": only captions are needed, but the same items as training (bad files skipped).
    return [text for _, text in CaptionedFolder(path, verify="header", strict=config.strict).items]
