"""load_pipeline and save: checkpoints in, checkpoints out.

Three inputs are accepted: an original single-file checkpoint (safetensors, or a legacy pickle
read through a restricted unpickler), a diffusers folder, or a preset name (random weights from
a seed). Networks are built on the meta device and filled with `assign=True`, so loading holds
about one copy of the weights. Two layouts are written, always as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch

from stablediff.diffusion.schedules import ScheduleConfig
from stablediff.models.clip import CLIPTextConfig, CLIPTextModel
from stablediff.models.unet import UNetConfig, UNetModel
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.nn import randomize_
from stablediff.pipeline import StableDiffusion
from stablediff.presets import PRESETS, ModelSpec, get_preset, spec_from_parts
from stablediff.tokenizer import CLIPTokenizer
from stablediff.version import __version__
from stablediff.weights import convert
from stablediff.weights.io import CheckpointError, read_metadata, read_state_dict, write_safetensors
from stablediff.weights.strict import load_strict

SPEC_METADATA_KEY = "stablediff.spec"
TOKENIZER_METADATA_KEY = "stablediff.tokenizer"  # a trained vocabulary (the CLIP one is package data)
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


def load_pipeline(
    path_or_preset: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    prediction_type: str | None = None,
    use_ema: bool = True,
    spec: ModelSpec | str | None = None,
    seed: int = 0,
) -> StableDiffusion:
    """Load a model.

    path_or_preset: a single-file checkpoint, a diffusers folder, a name in PRESETS (random
        weights), or "shapes" (the bundled model); None: `default_model()`.
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
        pipe = _load_diffusers(path, device, dtype, spec)
    elif path.exists():
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


def _build(spec: ModelSpec, unet_sd: dict, vae_sd: dict, text_sd: dict, tokenizer, device, dtype) -> StableDiffusion:
    with torch.device("meta"):
        unet, vae, text = UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextModel(spec.text)
    load_strict(unet, unet_sd, "unet", device=device, dtype=dtype)
    load_strict(vae, vae_sd, "vae", device=device, dtype=dtype)
    load_strict(text, text_sd, "text_encoder", device=device, dtype=dtype)
    return StableDiffusion(unet.eval(), vae.eval(), text.eval(), tokenizer, spec)


def _build_random(spec: ModelSpec, device, dtype, seed: int) -> StableDiffusion:
    generator = torch.Generator().manual_seed(seed)
    nets = [UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextModel(spec.text)]
    for net in nets:
        randomize_(net, generator).to(device=device, dtype=dtype).eval()
    return StableDiffusion(*nets, CLIPTokenizer.default(pad_token=spec.pad_token), spec)


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
        stored = metadata.get(SPEC_METADATA_KEY)
        if stored:
            spec = ModelSpec.from_json(stored)
        else:
            spec = spec_from_parts(parts["unet"], parts["vae"], parts["text"], parts["text_format"], "epsilon")
    if TOKENIZER_METADATA_KEY in metadata:
        tokenizer = CLIPTokenizer.from_dict(json.loads(metadata[TOKENIZER_METADATA_KEY]))
    else:
        tokenizer = CLIPTokenizer.default(pad_token=spec.pad_token)
    return _build(spec, parts["unet"], parts["vae"], parts["text"], tokenizer, device, dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _part_file(folder: Path, part: str) -> Path:
    for name in _WEIGHT_FILES[part]:
        if (folder / part / name).is_file():
            return folder / part / name
    raise CheckpointError(f"diffusers folder {folder}: {part}/ has none of {list(_WEIGHT_FILES[part])}")


def _load_diffusers(folder: Path, device, dtype, spec: ModelSpec | None) -> StableDiffusion:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a folder without model_index.json: not a diffusers model folder")
    for part in DIFFUSERS_PARTS:
        if not (folder / part).is_dir():
            raise CheckpointError(f"diffusers folder {folder} is missing {part}/")
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    files = {part: _part_file(folder, part) for part in ("unet", "vae", "text_encoder")}
    if spec is None:
        spec = _diffusers_spec(folder, files["unet"], tokenizer)
    u, v = spec.unet, spec.vae
    unet_sd = convert.unet_diffusers_to_ours(
        read_state_dict(files["unet"]), u.channel_mult, u.num_res_blocks, u.attention_levels
    )
    vae_sd = convert.vae_diffusers_to_ours(read_state_dict(files["vae"]), len(v.ch_mult), v.num_res_blocks)
    text_sd = convert.text_transformers_to_ours(read_state_dict(files["text_encoder"]))
    return _build(spec, unet_sd, vae_sd, text_sd, tokenizer, device, dtype)


def _diffusers_spec(folder: Path, unet_file: Path, tokenizer: CLIPTokenizer) -> ModelSpec:
    """The spec of a diffusers folder, from its config files (and from our own metadata when we
    wrote the folder: it keeps the name and schedule facts that configs do not carry)."""
    unet_json = _read_json(folder / "unet" / "config.json")
    vae_cfg = VAEConfig(**convert.vae_config_from_diffusers(_read_json(folder / "vae" / "config.json")))
    text_json = _read_json(folder / "text_encoder" / "config.json")
    text_cfg = CLIPTextConfig(**convert.text_config_from_transformers(text_json))
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    stored = read_metadata(unet_file).get(SPEC_METADATA_KEY) if unet_file.suffix == ".safetensors" else None
    if stored:
        spec = ModelSpec.from_json(stored)
    else:
        spec = ModelSpec(
            name=f"diffusers:{folder.name}",
            unet=UNetConfig(**convert.unet_config_from_diffusers(unet_json)),
            vae=vae_cfg,
            text=text_cfg,
            text_format="openclip" if text_cfg.activation == "gelu" else "openai",
            prediction_type=sched.get("prediction_type", "epsilon"),
            schedule=_schedule_from_diffusers(sched),
            default_size=unet_json.get("sample_size", 64) * vae_cfg.downscale,
        )
    # transformers runs every layer it has: the folder's text tower never skips layers.
    return replace(spec, text=text_cfg, pad_token=tokenizer.pad_token)


def _schedule_from_diffusers(sched: dict) -> ScheduleConfig:
    """The training schedule of a ``scheduler_config.json`` (its inference settings are not read)."""
    defaults = ScheduleConfig()
    return ScheduleConfig(
        num_train_timesteps=sched.get("num_train_timesteps", defaults.num_train_timesteps),
        beta_schedule=sched.get("beta_schedule", defaults.beta_schedule),
        beta_start=sched.get("beta_start", defaults.beta_start),
        beta_end=sched.get("beta_end", defaults.beta_end),
    )


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
        "timestep_spacing": schedule.timestep_spacing or "leading",
    }
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

    The model spec is stored in the file metadata, so a file we wrote loads back exactly
    (a round trip ours -> file -> ours is bit-exact). Nothing appears under `path` unless the
    whole write succeeded.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} not in {LAYOUTS}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    meta = {SPEC_METADATA_KEY: pipe.spec.to_json(), "stablediff.version": __version__, **(metadata or {})}
    if not pipe.tokenizer.is_default_vocabulary():
        meta[TOKENIZER_METADATA_KEY] = json.dumps(pipe.tokenizer.to_dict(), ensure_ascii=False)
    sds = {name: _cast(sd, dtype) for name, sd in pipe.state_dicts().items()}
    if layout == "single-file":
        write_safetensors(
            convert.join_single_file(sds["unet"], sds["vae"], sds["text"], pipe.spec.text_format), path, metadata=meta
        )
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_diffusers(pipe, sds, tmp, meta)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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
