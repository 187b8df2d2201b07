"""load_pipeline and save: checkpoints in, checkpoints out.

Three inputs are accepted: an original single-file checkpoint (safetensors, or a legacy pickle
read through a restricted unpickler), a diffusers folder, or a preset name (random weights from
a seed). Networks are built on the meta device and filled with `assign=True`, so loading holds
about one copy of the weights. Two layouts are written, always as safetensors.
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

from stablediff.diffusion.schedules import ScheduleConfig
from stablediff.errors import BadFileError, load_json
from stablediff.limits import check_limits, config_from_dict
from stablediff.models.clip import CLIPTextConfig, CLIPTextModel
from stablediff.models.unet import UNetConfig, UNetModel
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.nn import randomize_
from stablediff.pipeline import StableDiffusion
from stablediff.presets import (
    PRESETS,
    ModelSpec,
    get_preset,
    spec_from_parts,
)
from stablediff.spec_check import (
    SPEC_CHECKSUM_KEY,
    SPEC_METADATA_KEY,
    check_against_weights,
    check_fields,
    check_values,
    spec_checksum,
    stored_spec,
)
from stablediff.tokenizer import CLIPTokenizer
from stablediff.version import __version__
from stablediff.weights import convert
from stablediff.weights.io import (
    CheckpointError,
    detect_format,
    file_mode,
    read_metadata,
    read_shapes,
    read_state_dict,
    write_safetensors,
)
from stablediff.weights.strict import load_strict

TOKENIZER_METADATA_KEY = "stablediff.tokenizer"  # a trained vocabulary (the CLIP one is package data)
VERSION_METADATA_KEY = "stablediff.version"
logger = logging.getLogger(__name__)
# Written by `save` from the model itself; metadata passed to `save` (or carried over by a
# conversion) never replaces them.
MANAGED_METADATA_KEYS = (SPEC_METADATA_KEY, SPEC_CHECKSUM_KEY, TOKENIZER_METADATA_KEY, VERSION_METADATA_KEY)
LAYOUTS = ("single-file", "diffusers")
DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
_WEIGHT_FILES = {
    "unet": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
_WEIGHT_FILES["vae"] = _WEIGHT_FILES["unet"]
_WEIGHT_FILES["text_encoder_2"] = _WEIGHT_FILES["text_encoder"]
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
            tokenizer = _tokenizer(path / "tokenizer", lambda: CLIPTokenizer.from_folder(path / "tokenizer"))
            return _diffusers_spec(path, _part_file(path, "unet"), tokenizer)[0]
    if path.exists():
        if detect_format(path) != "safetensors":
            return None
        with _naming(path):
            spec = stored_spec(read_metadata(path), path)
            if spec is None:  # shapes alone, on the meta device: nothing is allocated
                meta = {k: torch.empty(shape, device="meta") for k, shape in read_shapes(path).items()}
                parts = convert.split_single_file(meta)
                spec = spec_from_parts(parts["unet"], parts["vae"], parts["text"], parts["text_format"], "epsilon")
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
        path = _part_file(path, "unet")
    return read_metadata(path)


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "Model hash": the first 10 hex digits of the SHA-256 of the weights file
    (of the U-Net's weights for a diffusers folder)."""
    path = Path(path)
    if path.is_dir():
        path = _part_file(path, "unet")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _build(
    spec: ModelSpec,
    unet_sd: dict,
    vae_sd: dict,
    text_sd: dict,
    tokenizer,
    device,
    dtype,
    text_2_sd: dict | None = None,
    tokenizer_2: CLIPTokenizer | None = None,
) -> StableDiffusion:
    """The pipeline of ``spec`` with the given our-named weights (``text_2_sd``: SDXL base's bigG,
    read with ``tokenizer_2``, by default CLIP's vocabulary padding with ``spec.pad_token_2``)."""
    with torch.device("meta"):
        unet, vae, text = UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextModel(spec.text)
        text_2 = None if spec.text_2 is None else CLIPTextModel(spec.text_2)
    load_strict(unet, unet_sd, "unet", device=device, dtype=dtype)
    load_strict(vae, vae_sd, "vae", device=device, dtype=dtype)
    load_strict(text, text_sd, "text_encoder", device=device, dtype=dtype)
    if text_2 is not None:
        load_strict(text_2, text_2_sd or {}, "text_encoder_2", device=device, dtype=dtype)
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
    state_dict = read_state_dict(path)
    parts = convert.split_single_file(state_dict, use_ema=use_ema)
    del state_dict  # the parts now hold the only references to the tensors
    if not parts["unet"] and not parts["vae"]:
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: no keys start with {convert.UNET_PREFIX!r} "
            f"or {convert.VAE_PREFIX!r} (first keys: {parts['unknown'][:3]})"
        )
    metadata = read_metadata(path)
    if spec is None:
        spec = stored_spec(metadata, path)
        if spec is not None:
            if parts["text"] and spec.text_format != parts["text_format"]:
                raise CheckpointError(
                    f"{path}: the stored model spec says text_format {spec.text_format!r} but the text encoder's "
                    f"keys are in the {parts['text_format']!r} format"
                )
            check_against_weights(spec, parts, path)
        else:
            spec = spec_from_parts(parts["unet"], parts["vae"], parts["text"], parts["text_format"], "epsilon")
    if TOKENIZER_METADATA_KEY in metadata:
        where = f"{path}: metadata {TOKENIZER_METADATA_KEY!r}"
        tokenizer = _tokenizer(
            where, lambda: CLIPTokenizer.from_dict(load_json(metadata[TOKENIZER_METADATA_KEY], where))
        )
    else:
        tokenizer = CLIPTokenizer.default(pad_token=spec.pad_token)
    return _build(spec, parts["unet"], parts["vae"], parts["text"], tokenizer, device, dtype)


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


def _tokenizer(source: object, read) -> CLIPTokenizer:
    """``read()`` a tokenizer from a stranger's files or metadata; what its parsing raises on data
    of the wrong shape (a list for a dict, a missing key) becomes a CheckpointError naming ``source``."""
    try:
        return read()
    except (TypeError, KeyError, AttributeError, IndexError, RecursionError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{source}: not a valid tokenizer ({type(err).__name__}: {err})") from None


def _read_json(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    value = load_json(data, str(path))
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _network_config(cls, read, data: dict, path: Path, keys: dict):
    """A network config from a diffusers/transformers config.json: ``read`` (a converter from
    convert.py) type-checks the file's values, then every field is checked against LIMITS before
    anything is built; errors name the file and its key."""
    try:
        fields = read(data)
    except BadFileError:
        raise
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return config_from_dict(cls, fields, str(path), keys)


def _default_size(unet_json: dict, path: Path, downscale: int) -> int:
    sample_size = unet_json.get("sample_size", 64)
    if type(sample_size) is not int:
        raise CheckpointError(f"{path}: sample_size must be an integer, got {sample_size!r:.60}")
    check_limits("ModelSpec", {"default_size": sample_size * downscale}, str(path), {"default_size": "sample_size"})
    return sample_size * downscale


def _part_file(folder: Path, part: str) -> Path:
    for name in _WEIGHT_FILES[part]:
        if (folder / part / name).is_file():
            return folder / part / name
    raise CheckpointError(f"diffusers folder {folder}: {part}/ has none of {list(_WEIGHT_FILES[part])}")


def _load_diffusers(folder: Path, device, dtype, spec: ModelSpec | None) -> StableDiffusion:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a folder without model_index.json: not a diffusers model folder")
    text, tok, text_2 = _text_parts(folder)
    for part in ("unet", "vae", text, tok):
        if not (folder / part).is_dir():
            raise CheckpointError(f"diffusers folder {folder} is missing {part}/")
    tokenizer = _tokenizer(folder / tok, lambda: CLIPTokenizer.from_folder(folder / tok))
    files = {part: _part_file(folder, part) for part in ("unet", "vae", text)}
    stored = False
    if spec is None:
        spec, stored = _diffusers_spec(folder, files["unet"], tokenizer)
    u, v = spec.unet, spec.vae
    unet_sd = convert.unet_diffusers_to_ours(
        read_state_dict(files["unet"]), u.channel_mult, u.num_res_blocks, u.attention_levels
    )
    vae_sd = convert.vae_diffusers_to_ours(read_state_dict(files["vae"]), len(v.ch_mult), v.num_res_blocks)
    # SDXL's bigG (the refiner's only tower) keeps its text_projection: its pooled output is projected
    text_sd = convert.text_transformers_to_ours(read_state_dict(files[text]), keep_projection=text != "text_encoder")
    text_2_sd = tokenizer_2 = None
    if text_2:
        tokenizer_2 = _tokenizer(folder / "tokenizer_2", lambda: CLIPTokenizer.from_folder(folder / "tokenizer_2"))
        spec = replace(spec, pad_token_2=tokenizer_2.pad_token)
        text_2_sd = convert.text_transformers_to_ours(
            read_state_dict(_part_file(folder, "text_encoder_2")), keep_projection=True
        )
    if stored:
        check_against_weights(spec, {"unet": unet_sd, "vae": vae_sd, "text": text_sd}, files["unet"])
    return _build(spec, unet_sd, vae_sd, text_sd, tokenizer, device, dtype, text_2_sd, tokenizer_2)


def _text_parts(folder: Path) -> tuple[str, str, bool]:
    """(text encoder folder, tokenizer folder, whether a second tower follows) of a diffusers
    folder: SD's text_encoder/; SDXL base's text_encoder/ then text_encoder_2/; SDXL refiner's
    text_encoder_2/ alone (bigG, our spec's only tower)."""
    first, second = (folder / "text_encoder").is_dir(), (folder / "text_encoder_2").is_dir()
    if second and not first:
        return "text_encoder_2", "tokenizer_2", False
    return "text_encoder", "tokenizer", second


def _diffusers_spec(folder: Path, unet_file: Path, tokenizer: CLIPTokenizer) -> tuple[ModelSpec, bool]:
    """The spec of a diffusers folder, from its config files (and from our own metadata when we
    wrote the folder: it keeps the name and schedule facts that configs do not carry), and whether
    it came from that metadata."""
    text, _, has_text_2 = _text_parts(folder)
    unet_path, vae_path, text_path = (folder / part / "config.json" for part in ("unet", "vae", text))
    unet_json = _read_json(unet_path)
    vae_cfg = _network_config(
        VAEConfig, convert.vae_config_from_diffusers, _read_json(vae_path), vae_path, convert.VAE_DIFFUSERS_KEYS
    )
    text_cfg = _text_config(text_path, projection=text != "text_encoder")
    text_2_cfg = _text_config(folder / "text_encoder_2" / "config.json", projection=True) if has_text_2 else None
    index = _read_json(folder / "model_index.json")
    force_zeros = index.get("force_zeros_for_empty_prompt", False)
    if type(force_zeros) is not bool:
        raise CheckpointError(f"{folder / 'model_index.json'}: force_zeros_for_empty_prompt must be true or false")
    unet_cfg = _network_config(
        UNetConfig, convert.unet_config_from_diffusers, unet_json, unet_path, convert.UNET_DIFFUSERS_KEYS
    )
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    spec = stored_spec(read_metadata(unet_file), unet_file) if unet_file.suffix == ".safetensors" else None
    stored = spec is not None
    if stored:
        # The weights are renamed with the spec's block layout, so it must agree with the
        # folder's configs (which describe the same weights) before the weights are read.
        check_fields(spec.unet, unet_cfg, "unet", unet_file, str(folder / "unet" / "config.json"))
        check_fields(spec.vae, vae_cfg, "vae", unet_file, str(folder / "vae" / "config.json"))
    else:
        spec = ModelSpec(
            name=f"diffusers:{folder.name}",
            unet=unet_cfg,
            vae=vae_cfg,
            text=text_cfg,
            text_2=text_2_cfg,
            force_zeros_for_empty_prompt=force_zeros,
            text_format="openclip" if text_cfg.activation == "gelu" else "openai",
            prediction_type=_prediction_type(sched, scheduler_path),
            schedule=_schedule_from_diffusers(sched, scheduler_path),
            default_size=_default_size(unet_json, unet_path, vae_cfg.downscale),
        )
        check_values(spec, folder)
    if spec.is_sdxl:
        # SDXL reads its towers' penultimate layer without the final norm (diffusers' hidden_states[-2])
        sdxl = lambda t: replace(t, skip_layers=1, context_norm=False)  # noqa: E731
        return replace(
            spec, text=sdxl(text_cfg), text_2=text_2_cfg and sdxl(text_2_cfg), pad_token=tokenizer.pad_token
        ), stored
    # transformers runs every layer it has: the folder's text tower never skips layers.
    return replace(spec, text=text_cfg, pad_token=tokenizer.pad_token), stored


def _text_config(path: Path, projection: bool) -> CLIPTextConfig:
    """A text tower's config.json; ``projection``: a CLIPTextModelWithProjection (SDXL's bigG)."""
    read = lambda c: convert.text_config_from_transformers(c, with_projection=projection)  # noqa: E731
    return _network_config(CLIPTextConfig, read, _read_json(path), path, convert.TEXT_TRANSFORMERS_KEYS)


# scheduler_config.json key -> ScheduleConfig field; a key the file lacks keeps our default.
_SCHEDULE_KEYS = {
    "num_train_timesteps": "num_train_timesteps",
    "beta_schedule": "beta_schedule",
    "beta_start": "beta_start",
    "beta_end": "beta_end",
    "rescale_betas_zero_snr": "rescale_zero_terminal_snr",
    "steps_offset": "steps_offset",
    "set_alpha_to_one": "set_alpha_to_one",
    "timestep_spacing": "timestep_spacing",
}
# diffusers' schedulers whose timestep_spacing defaults to "leading"; the others default to "linspace".
_LEADING_BY_DEFAULT = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler")
# Sampling preferences of a scheduler config that a model does not need: the sigma schedule is
# chosen per generation (GenerationParams.schedule, e.g. "karras"), so these are not honoured.
_SIGMA_PREFERENCES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _schedule_from_diffusers(sched: dict, where: object = "scheduler_config.json") -> ScheduleConfig:
    """The schedule of a ``scheduler_config.json``, checked like any config from a file
    (BadFileError naming ``where``): the training betas (``rescale_betas_zero_snr`` included) and
    the inference settings that every sampler honours, ``steps_offset``, ``set_alpha_to_one`` and
    ``timestep_spacing``. A key the file lacks keeps our default (SD's offset 1, no final alpha,
    and each sampler's own spacing).

    ``timestep_spacing`` is kept only when it differs from the default of the scheduler the file
    names (``_class_name``): diffusers writes every default, so SD folders it saved say "leading"
    for PNDM/DDIM without anyone choosing it, while SDXL base's "leading" Euler and SD-Turbo's
    "trailing" Euler are choices, honoured by every sampler as diffusers' ``from_config`` carries
    them over. Refused (CheckpointError): continuous timesteps (``timestep_type``), an explicit
    ``trained_betas`` table, and the EDM / flow-matching schedulers. Not honoured, with a warning:
    ``use_karras_sigmas`` and the other sigma-schedule flags (the schedule is a per-generation
    choice); silently ignored: the sampler-internal settings (``clip_sample``, ``thresholding``,
    ``interpolation_type``, ``final_sigmas_type``, ...), which our samplers fix to SD's values.
    """
    name = sched.get("_class_name")
    if isinstance(name, str) and name.startswith(("EDM", "FlowMatch")):
        raise CheckpointError(f"{where}: {name} is not supported (only discrete-time DDPM schedules)")
    if sched.get("timestep_type", "discrete") != "discrete":
        raise CheckpointError(
            f"{where}: timestep_type {sched['timestep_type']!r:.60} is not supported (only 'discrete')"
        )
    if sched.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: trained_betas (an explicit beta table) is not supported")
    values = {ours: sched[key] for key, ours in _SCHEDULE_KEYS.items() if key in sched}
    default_spacing = "leading" if name in _LEADING_BY_DEFAULT else "linspace"
    if values.get("timestep_spacing") == default_spacing:
        del values["timestep_spacing"]
    preferences = [key for key in _SIGMA_PREFERENCES if sched.get(key) is True]
    if preferences:
        logger.warning("%s: %s not honoured; pass schedule='karras' (or another) per generation", where, preferences)
    aliases = {ours: key for key, ours in _SCHEDULE_KEYS.items()}
    return config_from_dict(ScheduleConfig, values, str(where), aliases)


def _prediction_type(sched: dict, where: object) -> str:
    value = sched.get("prediction_type", "epsilon")
    if type(value) is not str:
        raise CheckpointError(f"{where}: prediction_type must be a string, got {value!r:.60}")
    return value


def _schedule_to_diffusers(schedule: ScheduleConfig, prediction_type: str) -> dict:
    """A diffusers ``scheduler_config.json`` (PNDM, as SD checkpoints ship) for ``schedule``."""
    config = {
        "_class_name": "PNDMScheduler",
        "beta_schedule": schedule.beta_schedule,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": prediction_type,
        "set_alpha_to_one": schedule.set_alpha_to_one,
        "skip_prk_steps": True,
        "steps_offset": schedule.steps_offset,
        "clip_sample": False,
    }
    # Only a spacing the spec has: diffusers' from_config carries a written one over to every other
    # scheduler. (Read from this file alone, a spec's "leading" is PNDM's own default and comes back
    # as None, see _schedule_from_diffusers; the spec stored in our weights keeps it.)
    if schedule.timestep_spacing is not None:
        config["timestep_spacing"] = schedule.timestep_spacing
    if schedule.rescale_zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
    return config


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
    """Write `pipe` as one safetensors file (original key names) or as a diffusers folder.

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
    if pipe.spec.is_sdxl:  # both layouts would need SDXL's conditioner keys / text_encoder_2 folder
        raise NotImplementedError("saving SDXL models is not supported yet (issue 19): load them from their files")
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
    if not pipe.tokenizer.is_default_vocabulary():
        meta[TOKENIZER_METADATA_KEY] = json.dumps(pipe.tokenizer.to_dict(), ensure_ascii=False)
    sds = {name: _cast(sd, dtype) for name, sd in pipe.state_dicts().items()}
    if layout == "single-file":
        tensors = convert.join_single_file(sds["unet"], sds["vae"], sds["text"], pipe.spec.text_format)
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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_diffusers(pipe: StableDiffusion, sds: dict, folder: Path, meta: dict) -> None:
    spec, tok = pipe.spec, pipe.tokenizer
    u, v, t = spec.unet, spec.vae, spec.text
    pipeline_class = "StableDiffusionInpaintPipeline" if spec.is_inpaint else "StableDiffusionPipeline"
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": pipeline_class,
            "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    )
    unet_json = convert.unet_config_to_diffusers(u.to_dict())
    unet_json["sample_size"] = spec.default_size // v.downscale
    _write_json(folder / "unet" / "config.json", unet_json)
    write_safetensors(
        convert.unet_ours_to_diffusers(sds["unet"], u.channel_mult, u.num_res_blocks, u.attention_levels),
        folder / "unet" / "diffusion_pytorch_model.safetensors",
        metadata=meta,
    )
    vae_json = convert.vae_config_to_diffusers(v.to_dict())
    vae_json["sample_size"] = spec.default_size
    _write_json(folder / "vae" / "config.json", vae_json)
    write_safetensors(
        convert.vae_ours_to_diffusers(sds["vae"], len(v.ch_mult), v.num_res_blocks),
        folder / "vae" / "diffusion_pytorch_model.safetensors",
        metadata=meta,
    )
    # transformers' CLIPTextModel always runs all its layers: layers the spec skips are not written.
    kept = t.layers - t.skip_layers
    text_sd = {
        k: w for k, w in sds["text"].items() if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < kept
    }
    text_json = convert.text_config_to_transformers({**t.to_dict(), "layers": kept}, tok.bos_id, tok.eos_id, tok.pad_id)
    _write_json(folder / "text_encoder" / "config.json", text_json)
    write_safetensors(
        convert.text_ours_to_transformers(text_sd),
        folder / "text_encoder" / "model.safetensors",
        metadata={"format": "pt"},
    )
    tok.save(folder / "tokenizer")
    scheduler_json = _schedule_to_diffusers(spec.schedule, spec.prediction_type)
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_json)
