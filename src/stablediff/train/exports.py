"""Exported parts: what a finished stage writes for the stages after it and for `load_pipeline`,
and how a run reads them back.

A stage's run folder keeps its finished part in `export/` (`EXPORT_DIR`):

- tokenizer stage: `tokenizer/` (`TOKENIZER_DIR`: the four files of a CLIP tokenizer);
- vae stage: `vae.safetensors` (`VAE_PART`), with the measured latent scale in its config;
- text stage: `text_encoder.safetensors` (`TEXT_PART`) and `tokenizer/`;
- U-Net stages: `model.safetensors` (`MODEL_FILE`, a whole model that `load_pipeline` reads, with
  the training config under `TRAIN_CONFIG_KEY`) and `tokenizer/`.

A part file holds one network under our key names and its config as JSON in the metadata, so
`read_part` rebuilds it without being told its size. `frozen_parts` gathers what a U-Net run
trains against: the VAE, the text encoder and the tokenizer, from exports or from full models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablediff.errors import load_json
from stablediff.loading import load_pipeline
from stablediff.models.clip import CLIPTextConfig, CLIPTextModel
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.nn import randomize_
from stablediff.presets import PRESETS
from stablediff.seeds import derive_seed
from stablediff.tokenizer import CLIPTokenizer
from stablediff.train.config import TrainConfig
from stablediff.weights.io import read_metadata, read_state_dict, write_safetensors
from stablediff.weights.strict import load_strict

EXPORT_DIR = "export"
TOKENIZER_DIR = "tokenizer"
MODEL_FILE = "model.safetensors"
TRAIN_CONFIG_KEY = "stablediff.train_config"


@dataclass(frozen=True)
class Part:
    """One network exported as a safetensors file: its file name, the metadata key of its config,
    the stage that writes it, and its config and module classes."""

    label: str
    file: str
    config_key: str
    stage: str
    config_class: type
    module_class: type


VAE_PART = Part("VAE", "vae.safetensors", "stablediff.vae_config", "vae", VAEConfig, AutoencoderKL)
TEXT_PART = Part(
    "text encoder", "text_encoder.safetensors", "stablediff.text_config", "text", CLIPTextConfig, CLIPTextModel
)


def write_part(
    part: Part, module: nn.Module, out_dir: str | Path, config: Any = None, metadata: dict[str, str] | None = None
) -> Path:
    """Write `module`'s weights (float32) as `out_dir/part.file`, with `config` (default: the
    module's own) and `metadata` in the file's metadata; returns the file."""
    out = Path(out_dir) / part.file
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    config = config if config is not None else module.config
    write_safetensors(tensors, out, {part.config_key: json.dumps(config.to_dict()), **(metadata or {})})
    return out


def read_part(part: Part, path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The network written by `write_part` (a file, or a folder holding `part.file`), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / part.file
    if not path.is_file():
        raise FileNotFoundError(f"no trained {part.label} at {path}")
    meta = read_metadata(path)
    if part.config_key not in meta:
        raise ValueError(
            f"{path} has no {part.config_key!r} metadata: not a {part.label} written by the {part.stage} stage"
        )
    with torch.device("meta"):
        where = f"{path}: metadata {part.config_key!r}"
        module = part.module_class(part.config_class.from_dict(load_json(meta[part.config_key], where), where))
    load_strict(module, read_state_dict(path), f"{part.label} {path}", device=device)
    return module.eval()


def load_tokenizer(path: str | Path | None) -> CLIPTokenizer:
    """The tokenizer a run uses: a tokenizer folder, a folder holding `tokenizer/` (a run or an
    export), or, for an empty path, the standard CLIP vocabulary."""
    if not path:
        return CLIPTokenizer.default()
    folder = Path(path)
    if not (folder / "vocab.json").is_file() and (folder / TOKENIZER_DIR / "vocab.json").is_file():
        folder = folder / TOKENIZER_DIR
    return CLIPTokenizer.from_folder(folder)


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
    # SDXL base's second text encoder (bigG) and its tokenizer, from config.base; None otherwise
    text_encoder_2: CLIPTextModel | None = None
    tokenizer_2: CLIPTokenizer | None = None


def frozen_parts(config: TrainConfig, device: torch.device) -> FrozenParts:
    """The frozen VAE, text encoder and tokenizer of a U-Net run. Per part, the first that applies:

    - VAE: ``config.vae`` (a VAE export, a folder holding it, a run folder whose ``export/`` holds
      it, or a full model), else ``config.base`` (a model ``load_pipeline`` reads), else a random
      frozen VAE of the "tiny" preset (for tests);
    - text encoder (+ its tokenizer): ``config.text`` (a text export with its ``tokenizer/``, a run
      folder whose ``export/`` holds them, or a full model), else ``config.base``, else a random
      "tiny" one with the standard CLIP vocabulary;
    - tokenizer: ``config.tokenizer`` when given (a tokenizer folder, or a folder holding
      ``tokenizer/``), else the text encoder's;
    - SDXL base: both text encoders and tokenizers come from ``config.base`` (``text`` and
      ``tokenizer`` would replace one of two, and are refused).
    """
    base = load_model(config.base, device) if config.base else None
    text_2 = tokenizer_2 = None
    if base is not None and base.spec.is_sdxl:
        given = [f"--{name}" for name in ("text", "tokenizer") if getattr(config, name)]
        if given:
            raise ValueError(
                f"{' and '.join(given)} cannot be used with the SDXL base {config.base!r}: its two text encoders "
                "and tokenizers come from the base model"
            )
        text_2, tokenizer_2 = base.text_encoder_2, base.tokenizer_2
    tiny = PRESETS["tiny"]
    if config.vae:
        folder = find_export(config.vae, VAE_PART.file)
        vae = read_part(VAE_PART, folder, device) if folder else load_model(config.vae, device).vae
    elif base is not None:
        vae = base.vae
    else:
        vae = randomize_(AutoencoderKL(tiny.vae), torch.Generator().manual_seed(derive_seed(config.seed, "vae")))
    tokenizer = None
    if config.text:
        folder = find_export(config.text, TEXT_PART.file)
        if folder:
            text, tokenizer = read_part(TEXT_PART, folder, device), load_tokenizer(folder)
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
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the text encoder only "
            f"{text.config.vocab_size} embeddings"
        )
    if tokenizer.max_length > text.config.max_positions:
        raise ValueError(
            f"the tokenizer makes {tokenizer.max_length} tokens but the text encoder has "
            f"{text.config.max_positions} positions"
        )
    vae, text = (freeze(m.to(device=device, dtype=torch.float32)) for m in (vae, text))
    if text_2 is not None:
        text_2 = freeze(text_2.to(device=device, dtype=torch.float32))
    return FrozenParts(vae, text, tokenizer, base, text_2, tokenizer_2)
