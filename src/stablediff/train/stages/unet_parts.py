"""What the U-Net stage trains with besides the U-Net: the frozen VAE, text encoder and tokenizer,
and its data (images or cached latents, with caption dropout).

Where the frozen parts come from, per part, the first that applies:

- VAE: ``config.vae`` (a VAE export ``vae.safetensors``, a folder holding it, a run folder whose
  ``export/`` holds it, or a full model), else ``config.base`` (a model ``load_pipeline`` reads),
  else a random frozen VAE of the "tiny" preset (for tests);
- text encoder (+ its tokenizer): ``config.text`` (a text export ``text_encoder.safetensors`` +
  ``tokenizer/``, or a run folder whose ``export/`` holds them, or a full model), else
  ``config.base``, else a random "tiny" one with the standard CLIP vocabulary;
- tokenizer: ``config.tokenizer`` when given (a tokenizer folder, or a folder holding
  ``tokenizer/``), else the text encoder's.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from stablediff.models.clip import CLIPTextModel
from stablediff.models.vae import AutoencoderKL
from stablediff.nn import randomize_
from stablediff.presets import PRESETS
from stablediff.tokenizer import CLIPTokenizer
from stablediff.train.config import TrainConfig
from stablediff.train.data import derive_seed
from stablediff.train.grounding import item_regions
from stablediff.train.latents import LatentCacheDataset
from stablediff.train.order import set_epoch
from stablediff.train.stages.text import TEXT_FILE, load_text_export
from stablediff.train.stages.tokenizer import load_tokenizer
from stablediff.train.stages.vae import VAE_FILE, image_text_data, load_vae_export
from stablediff.train.trainer import EXPORT_DIR

logger = logging.getLogger(__name__)


def find_export(path: str | Path, filename: str) -> Path | None:
    """The folder holding `filename` among `path` and `path/export/` (or `path`'s folder when
    `path` is that file); None when neither holds it (then `path` may be a full model)."""
    path = Path(path)
    if path.is_file():
        return path.parent if path.name == filename else None
    for folder in (path, path / EXPORT_DIR):
        if (folder / filename).is_file():
            return folder
    return None


def load_model(path: str, device: torch.device):
    """A full model (single file or diffusers folder) through `load_pipeline`, in float32."""
    from stablediff.loading import load_pipeline

    if not Path(path).exists():
        raise ValueError(f"model {path!r} does not exist")
    return load_pipeline(path, device=device)


def freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


@dataclass
class FrozenParts:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    base: Any = None  # the StableDiffusion loaded from config.base, when one was


def frozen_parts(config: TrainConfig, device: torch.device) -> FrozenParts:
    """The frozen VAE, text encoder and tokenizer of a U-Net run (see the module docstring)."""
    base = load_model(config.base, device) if config.base else None
    tiny = PRESETS["tiny"]
    if config.vae:
        folder = find_export(config.vae, VAE_FILE)
        vae = load_vae_export(folder, device) if folder else load_model(config.vae, device).vae
    elif base is not None:
        vae = base.vae
    else:
        vae = randomize_(AutoencoderKL(tiny.vae), torch.Generator().manual_seed(derive_seed(config.seed, "vae")))
    tokenizer = None
    if config.text:
        folder = find_export(config.text, TEXT_FILE)
        if folder:
            text, tokenizer = load_text_export(folder, device)
        else:
            other = load_model(config.text, device)
            text, tokenizer = other.text_encoder, other.tokenizer
    elif base is not None:
        text, tokenizer = base.text_encoder, base.tokenizer
    else:
        text = randomize_(CLIPTextModel(tiny.text), torch.Generator().manual_seed(derive_seed(config.seed, "text")))
        tokenizer = CLIPTokenizer.default(pad_token=tiny.pad_token)
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.vocab_size > text.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the text encoder only "
                         f"{text.config.vocab_size} embeddings")  # fmt: skip
    if tokenizer.max_length > text.config.max_positions:
        raise ValueError(f"the tokenizer makes {tokenizer.max_length} tokens but the text encoder has "
                         f"{text.config.max_positions} positions")  # fmt: skip
    vae, text = (freeze(m.to(device=device, dtype=torch.float32)) for m in (vae, text))
    return FrozenParts(vae, text, tokenizer, base)


# ---------------------------------------------------------------------------------------------
# Data
class CaptionDropout(Dataset):
    """(x, caption) items with the caption replaced by "" with probability `p`, drawn from a
    generator seeded by (seed, epoch, index): classifier-free guidance needs the unconditional case."""

    def __init__(self, dataset: Dataset, p: float, seed: int):
        self.dataset, self.p, self.seed, self.epoch = dataset, p, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_epoch(self.dataset, epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        (x, text), regions = item[:2], item_regions(item)
        if random.Random(derive_seed(self.seed, "caption-dropout", self.epoch, index)).random() < self.p:
            text, regions = "", [] if regions is not None else None  # an empty caption grounds nothing
        return (x, text) if regions is None else (x, text, regions)


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


def _latent_data(config: TrainConfig, vae: AutoencoderKL) -> tuple[Dataset, Dataset]:
    cache = LatentCacheDataset(config.data, caption_dropout=0.0, seed=config.seed,
                               regions=config.grounding_weight > 0)  # fmt: skip
    stored = cache.metadata.get("vae_config")
    if stored and json.loads(stored) not in (None, json.loads(json.dumps(vae.config.to_dict()))):
        raise ValueError(f"latent cache {config.data} was encoded with another VAE than this run's "
                         f"(cache: {stored}; run: {vae.config.to_dict()})")  # fmt: skip
    if cache.latent_shape[0] != vae.config.z_channels:
        raise ValueError(f"latent cache {config.data} has {cache.latent_shape[0]} latent channels, "
                         f"the VAE {vae.config.z_channels}")  # fmt: skip
    plain = copy.copy(cache)
    plain.sample = False  # evaluate on posterior means: the same numbers every time
    plain.regions = None  # the held-out loss is the denoising loss: no token boxes to build
    n_eval = min(config.eval_size, len(cache) // 10)
    if n_eval == 0:
        logger.warning("%s: %d items are too few to hold some out; evaluating on training items",
                       config.data, len(cache))  # fmt: skip
        return cache, Subset(plain, range(min(config.eval_size, len(cache))))
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(config.seed)).tolist()
    return Subset(cache, sorted(order[n_eval:])), Subset(plain, sorted(order[:n_eval]))


def unet_data(config: TrainConfig, vae: AutoencoderKL) -> tuple[Dataset, Dataset, bool]:
    """(training set with caption dropout, held-out set, whether items are latents)."""
    if not config.data:
        raise ValueError("--data is required: a captioned image folder, a latent cache (.safetensors) or 'shapes'")
    path = Path(config.data)
    if config.data != "shapes" and not path.exists():
        raise ValueError(f"training data {config.data!r} does not exist (expected a captioned image folder, "
                         "a latent cache file or 'shapes')")  # fmt: skip
    latents = path.is_file()
    if config.grounding_weight and not latents and config.data != "shapes":
        raise ValueError(f"grounding_weight needs captions with grounding regions: --data shapes or a latent cache "
                         f"that stores them; the captioned folder {config.data!r} has none")  # fmt: skip
    train, held = _latent_data(config, vae) if latents else image_text_data(config, config.grounding_weight > 0)
    if len(train) == 0:
        raise ValueError(f"training data {config.data!r} is empty")
    return CaptionDropout(train, config.caption_dropout, config.seed), held, latents
