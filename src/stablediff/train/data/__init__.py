"""Training data: captioned folders, latent caches, and what each stage trains on.

- :mod:`.folder`: ``CaptionedFolder``, a folder of captioned images and its bad-file policy;
- :mod:`.latent_cache`: ``encode_latent_cache`` and ``LatentCacheDataset``, VAE posteriors stored once;
- :mod:`.stage_data`: ``image_text_data``, ``unet_data``, ``caption_corpus``: a stage's training and
  held-out sets from ``TrainConfig.data``, with caption dropout where the U-Net needs it.
"""

from stablediff.train.data.folder import CaptionedFolder, ImageGeometry, item_geometry
from stablediff.train.data.latent_cache import LatentCacheDataset, encode_latent_cache
from stablediff.train.data.stage_data import (
    CaptionDropout,
    ShapesPairs,
    caption_corpus,
    captions_of,
    image_text_data,
    unet_data,
)

__all__ = [
    "CaptionDropout",
    "CaptionedFolder",
    "ImageGeometry",
    "LatentCacheDataset",
    "ShapesPairs",
    "caption_corpus",
    "captions_of",
    "encode_latent_cache",
    "image_text_data",
    "item_geometry",
    "unet_data",
]
