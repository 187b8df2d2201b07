"""load_pipeline and save: checkpoints in, checkpoints out.

Three inputs are accepted: an original single-file checkpoint (safetensors, or a legacy pickle
read through a restricted unpickler; SD 1.x/2.x or SDXL, `single_file`), a diffusers folder
(`diffusers_folder`), or a preset name (random weights from a seed). Networks are built on the
meta device and filled with `assign=True`, so loading holds about one copy of the weights. Two
layouts are written, always as safetensors, each replacing an old model only once it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch

from stablediff.diffusers_folder import part_file, read_diffusers, read_diffusers_spec, read_tokenizer, write_diffusers
from stablediff.errors import BadFileError, load_json
from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetModel
from stablediff.models.vae import AutoencoderKL
from stablediff.nn import randomize_
from stablediff.pipeline import StableDiffusion
from stablediff.presets import PRESETS, ModelSpec, get_preset

# Kept importable from here, where they were before the diffusers-folder reader moved out.
from stablediff.scheduler_config import schedule_from_diffusers as _schedule_from_diffusers  # noqa: F401
from stablediff.scheduler_config import schedule_to_diffusers as _schedule_to_diffusers  # noqa: F401
from stablediff.single_file import join_single_file, read_single_file, spec_from_split
from stablediff.spec_check import SPEC_CHECKSUM_KEY, SPEC_METADATA_KEY, spec_checksum, stored_spec
from stablediff.tokenizer import CLIPTokenizer
from stablediff.version import __version__
from stablediff.weights import convert
from stablediff.weights.io import (
    CheckpointError,
    detect_format,
    file_mode,
    read_metadata,
    read_shapes,
    write_safetensors,
)
from stablediff.weights.strict import WeightMismatchError, load_strict

TOKENIZER_METADATA_KEY = "stablediff.tokenizer"  # a trained vocabulary (the CLIP one is package data)
TOKENIZER_2_METADATA_KEY = "stablediff.tokenizer_2"  # SDXL base's second tokenizer, when not CLIP's
VERSION_METADATA_KEY = "stablediff.version"
logger = logging.getLogger(__name__)
# Written by `save` from the model itself; metadata passed to `save` (or carried over by a
# conversion) never replaces them.
MANAGED_METADATA_KEYS = (
    SPEC_METADATA_KEY,
    SPEC_CHECKSUM_KEY,
    TOKENIZER_METADATA_KEY,
    TOKENIZER_2_METADATA_KEY,
    VERSION_METADATA_KEY,
)
LAYOUTS = ("single-file", "diffusers")
DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
# `save` writes a diffusers folder through this name (tests replace it to fail a write midway).
_write_diffusers = write_diffusers
# A file `save(..., overwrite=True)` may replace: safetensors by content, or a torch checkpoint by
# content with one of these names (a pickle may hold anything).
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def load_pipeline(
    path_or_preset: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    *,
    prediction_type: str | None = None,
    use_ema: bool = True,
    spec: ModelSpec | str | None = None,
    seed: int = 0,
) -> StableDiffusion:
    """Load a model.

    path_or_preset: a single-file checkpoint, a diffusers folder, a name in PRESETS (random
        weights), or "shapes" (the bundled model); None: `default_model()`.
    dtype: of the floating weights; None keeps each tensor's stored dtype (presets: float32).
    prediction_type: overrides the spec ("v_prediction" cannot be seen in weights).
    use_ema: use the EMA copy of the U-Net when a single-file checkpoint has one.
    spec: force a ModelSpec (or preset name) instead of recognising it from the weights.
    seed: for presets, the seed of the random weights.
    """
    if path_or_preset is None:
        path_or_preset = default_model()
    if str(path_or_preset) == BUNDLED_NAME:
        path_or_preset = bundled_model_path()
    path = Path(path_or_preset)
    if isinstance(spec, str):
        spec = get_preset(spec)
    if path.is_dir():
        with _naming(path):
            pipe = _load_diffusers(path, device, dtype, spec)
    elif path.exists():
        with _naming(path):
            pipe = _load_single_file(path, device, dtype, use_ema, spec)
    elif str(path_or_preset) in PRESETS:
        pipe = _build_random(spec or get_preset(str(path_or_preset)), device, dtype, seed)
    else:
        raise ValueError(
            f"{str(path_or_preset)!r} is neither an existing file or folder nor a preset; presets are {sorted(PRESETS)}"
        )
    if path.exists():
        pipe.source = str(path.resolve())
    if prediction_type is not None:
        pipe.spec = replace(pipe.spec, prediction_type=prediction_type)
    return pipe


def read_spec(path_or_preset: str | os.PathLike | None = None) -> ModelSpec | None:
    """A model's ModelSpec without reading its weights (for memory estimates before loading): a
    preset's; the spec our files store; a diffusers folder's configs; the tensor shapes of a
    foreign safetensors file. None for pickled checkpoints, which must be read to be known."""
    if path_or_preset is None:
        path_or_preset = default_model()
    path = bundled_model_path() if str(path_or_preset) == BUNDLED_NAME else Path(path_or_preset)
    if path.is_dir():
        with _naming(path):
            return read_diffusers_spec(path)
    if path.exists():
        if detect_format(path) != "safetensors":
            return None
        with _naming(path):
            spec = stored_spec(read_metadata(path), path)
            if spec is None:  # shapes alone, on the meta device: nothing is allocated
                meta = {k: torch.empty(shape, device="meta") for k, shape in read_shapes(path).items()}
                spec = spec_from_split(convert.split_single_file(meta))
            return spec
    return get_preset(str(path_or_preset)) if str(path_or_preset) in PRESETS else None


BUNDLED_NAME = "shapes"


def bundled_model_path() -> Path:
    """The model shipped inside the package (trained by `make bundled-model`)."""
    path = Path(str(resources.files("stablediff").joinpath("data", "shapes.safetensors")))
    if not path.is_file():
        raise CheckpointError(f"the bundled model {path} is missing: reinstall stablediff or run `make bundled-model`")
    return path


def default_model() -> str:
    """The model used when none is named: $STABLEDIFF_MODEL, else the bundled shapes model."""
    return os.environ.get("STABLEDIFF_MODEL") or BUNDLED_NAME


def model_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata a model carries: a safetensors file's, or that of a diffusers folder's U-Net
    weights (where `load_pipeline` reads our spec); {} for pickles and .bin files."""
    path = Path(path)
    if path.is_dir():
        path = part_file(path, "unet")
    return read_metadata(path)


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "Model hash": the first 10 hex digits of the SHA-256 of the weights file
    (of the U-Net's weights for a diffusers folder)."""
    path = Path(path)
    if path.is_dir():
        path = part_file(path, "unet")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _build(
    spec: ModelSpec,
    sds: dict[str, dict],
    tokenizer: CLIPTokenizer,
    device,
    dtype,
    tokenizer_2: CLIPTokenizer | None = None,
) -> StableDiffusion:
    """The pipeline of ``spec`` with the given our-named weights ({"unet", "vae", "text", and
    "text_2" for SDXL base: bigG, read with ``tokenizer_2``, by default CLIP's vocabulary padding
    with ``spec.pad_token_2``})."""
    if spec.text_2 is None and sds.get("text_2"):
        raise WeightMismatchError(
            f"text_encoder_2: the checkpoint has a second text encoder ({len(sds['text_2'])} tensors) "
            f"but the model spec {spec.name!r} has none"
        )
    with torch.device("meta"):
        unet, vae, text = UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextModel(spec.text)
        text_2 = None if spec.text_2 is None else CLIPTextModel(spec.text_2)
    load_strict(unet, sds["unet"], "unet", device=device, dtype=dtype)
    load_strict(vae, sds["vae"], "vae", device=device, dtype=dtype)
    load_strict(text, sds["text"], "text_encoder", device=device, dtype=dtype)
    if text_2 is not None:
        load_strict(text_2, sds.get("text_2", {}), "text_encoder_2", device=device, dtype=dtype)
        text_2.eval()
    return StableDiffusion(
        unet.eval(), vae.eval(), text.eval(), tokenizer, spec, text_2, tokenizer_2 or _tokenizer_2(spec)
    )


def _tokenizer_2(spec: ModelSpec) -> CLIPTokenizer | None:
    """SDXL base's second tokenizer: CLIP's vocabulary padding with ``spec.pad_token_2``."""
    return None if spec.text_2 is None else CLIPTokenizer.default(pad_token=spec.pad_token_2)


def _build_random(spec: ModelSpec, device, dtype, seed: int) -> StableDiffusion:
    generator = torch.Generator().manual_seed(seed)
    nets = [UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextModel(spec.text)]
    text_2 = None if spec.text_2 is None else CLIPTextModel(spec.text_2)
    for net in [*nets, *([text_2] if text_2 is not None else [])]:
        randomize_(net, generator).to(device=device, dtype=dtype).eval()
    tokenizer = CLIPTokenizer.default(pad_token=spec.pad_token)
    return StableDiffusion(*nets, tokenizer, spec, text_2, _tokenizer_2(spec))


def _load_single_file(path: Path, device, dtype, use_ema: bool, spec: ModelSpec | None) -> StableDiffusion:
    spec, sds, metadata = read_single_file(path, use_ema, spec)
    tokenizer = _metadata_tokenizer(metadata, TOKENIZER_METADATA_KEY, path, spec.pad_token)
    tokenizer_2 = None
    if spec.text_2 is not None:
        tokenizer_2 = _metadata_tokenizer(metadata, TOKENIZER_2_METADATA_KEY, path, spec.pad_token_2)
    return _build(spec, sds, tokenizer, device, dtype, tokenizer_2)


def _metadata_tokenizer(metadata: dict[str, str], key: str, path: Path, pad_token: str) -> CLIPTokenizer:
    """A trained vocabulary our file stores under ``key``, else CLIP's padding with ``pad_token``."""
    if key not in metadata:
        return CLIPTokenizer.default(pad_token=pad_token)
    where = f"{path}: metadata {key!r}"
    return read_tokenizer(where, lambda: CLIPTokenizer.from_dict(load_json(metadata[key], where)))


def _load_diffusers(folder: Path, device, dtype, spec: ModelSpec | None) -> StableDiffusion:
    spec, sds, tokenizer, tokenizer_2 = read_diffusers(folder, spec)
    return _build(spec, sds, tokenizer, device, dtype, tokenizer_2)


@contextlib.contextmanager
def _naming(path: Path):
    """Errors while reading the model at ``path`` name it: every ValueError (a bad key, shape,
    config value) becomes a BadFileError whose message names ``path``; WeightMismatchError and the
    other BadFileError kinds keep their class, others become CheckpointError."""
    try:
        yield
    except ValueError as err:
        named = str(path) in str(err)
        if named and isinstance(err, BadFileError):
            raise
        kind = type(err) if isinstance(err, BadFileError) else CheckpointError
        raise kind(str(err) if named else f"{path}: {err}") from err


# --------------------------------------------------------------------------------------------
# Writing.


def _cast(sd: dict, dtype: torch.dtype | None) -> dict:
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
    return {k: cast(v).detach().cpu() for k, v in sd.items()}


def save(
    pipe: StableDiffusion,
    path: str | os.PathLike,
    layout: str = "single-file",
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `pipe` as one safetensors file (original key names: SD 1.x/2.x's, or those of
    Stability's SDXL base / refiner files) or as a diffusers folder (SDXL: text_encoder_2/,
    tokenizer_2/ and the SDXL pipeline's model_index.json).

    The model spec is stored in the file metadata with its checksum, so a file we wrote loads
    back exactly (a round trip ours -> file -> ours is bit-exact). `metadata` is added, except
    the keys in MANAGED_METADATA_KEYS, which come from the model. `dtype` None keeps each
    tensor's dtype. Nothing appears under `path` unless the whole write succeeded.

    `overwrite` replaces only a model: a diffusers folder (it has model_index.json), an empty
    folder, or a weight file (safetensors, or a torch checkpoint named as in MODEL_FILE_SUFFIXES);
    anything else raises FileExistsError and is left alone. The new model is written next to the old one
    and moved into place, so a failed write leaves the old model as it was.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} not in {LAYOUTS}")
    path = Path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        _check_replaceable(path)
    spec_json = pipe.spec.to_json()
    meta = {k: v for k, v in (metadata or {}).items() if k not in MANAGED_METADATA_KEYS}
    meta.update(
        {SPEC_METADATA_KEY: spec_json, SPEC_CHECKSUM_KEY: spec_checksum(spec_json), VERSION_METADATA_KEY: __version__}
    )
    for key, tokenizer in ((TOKENIZER_METADATA_KEY, pipe.tokenizer), (TOKENIZER_2_METADATA_KEY, pipe.tokenizer_2)):
        if tokenizer is not None and not tokenizer.is_default_vocabulary():
            meta[key] = json.dumps(tokenizer.to_dict(), ensure_ascii=False)
    sds = {name: _cast(sd, dtype) for name, sd in pipe.state_dicts().items()}
    if layout == "single-file":
        tensors = join_single_file(pipe.spec, sds)
        if not path.is_dir():  # nothing there, or a file: the write replaces it atomically
            write_safetensors(tensors, path, metadata=meta)
            return path
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # a model folder becomes a file
        try:
            write_safetensors(tensors, tmp, metadata=meta)
            _move_into_place(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp makes it 0o700
        _write_diffusers(pipe, sds, tmp, meta)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_replaceable(path: Path) -> None:
    """Raise FileExistsError unless `path` is a model that `save(..., overwrite=True)` may replace."""
    if path.is_dir():
        if (path / "model_index.json").is_file() or not any(path.iterdir()):
            return
        raise FileExistsError(
            f"{path} is a folder that is not a model (no model_index.json) and not empty: refusing to replace it; "
            "move it away or choose another target"
        )
    if path.is_file():
        with contextlib.suppress(CheckpointError):
            if detect_format(path) == "safetensors" or path.suffix.lower() in MODEL_FILE_SUFFIXES:
                return
    raise FileExistsError(
        f"{path} exists and is not a model file (safetensors, or a torch checkpoint named "
        f"{'/'.join(MODEL_FILE_SUFFIXES)}): refusing to replace it; move it away or choose another target"
    )


def _move_into_place(new: Path, path: Path) -> None:
    """Rename `new` (a finished file or folder) to `path`. An old `path` is first renamed aside and
    removed only once `new` is in place; if the second rename fails, the old one goes back."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    aside = path.with_name(f".{path.name}.old-{secrets.token_hex(6)}")
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    try:
        shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
    except OSError as err:  # the new model is in place; only the old copy is left behind
        logger.warning("replaced %s but could not remove the old copy %s: %s", path, aside, err)
