"""diffusers folders in and out: model_index.json, one subfolder per network, tokenizers, scheduler.

Reading gives a model's spec (from the configs, or from the spec our own folders store in the
U-Net's weights), its weights in our names and its tokenizers; `loading` builds the pipeline.
Writing lays out what diffusers' `save_pretrained` writes for StableDiffusion(Inpaint)Pipeline, or
for SDXL StableDiffusionXLPipeline (text_encoder/ and text_encoder_2/) and the refiner's
StableDiffusionXLImg2ImgPipeline (text_encoder_2/ alone), so diffusers' `from_pretrained` reads it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from stablediff.errors import BadFileError, load_json
from stablediff.limits import check_limits, config_from_dict
from stablediff.models.clip import CLIPTextConfig
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig
from stablediff.presets import ModelSpec
from stablediff.scheduler_config import prediction_type_from_diffusers, schedule_from_diffusers, schedule_to_diffusers
from stablediff.spec_check import check_against_weights, check_fields, check_values, stored_spec
from stablediff.tokenizer import CLIPTokenizer
from stablediff.weights import convert
from stablediff.weights.io import CheckpointError, read_metadata, read_state_dict, write_safetensors

DIFFUSERS_VERSION = "0.42.1"  # the version whose save_pretrained our folders follow
WEIGHT_FILES = {
    "unet": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
WEIGHT_FILES["vae"] = WEIGHT_FILES["unet"]
WEIGHT_FILES["text_encoder_2"] = WEIGHT_FILES["text_encoder"]
# The special-token ids of the published SDXL text-encoder configs (OpenAI's legacy ones): with
# eos_token_id 2, transformers pools at the argmax of the ids, exactly as our CLIPTextModel does.
SDXL_TEXT_IDS = {"bos_id": 0, "eos_id": 2, "pad_id": 1}


def read_tokenizer(source: object, read) -> CLIPTokenizer:
    """``read()`` a tokenizer from a stranger's files or metadata; what its parsing raises on data
    of the wrong shape (a list for a dict, a missing key) becomes a CheckpointError naming ``source``."""
    try:
        return read()
    except (TypeError, KeyError, AttributeError, IndexError, RecursionError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{source}: not a valid tokenizer ({type(err).__name__}: {err})") from None


def part_file(folder: Path, part: str) -> Path:
    """The weights file of ``folder``'s ``part`` (unet, vae, text_encoder, text_encoder_2)."""
    for name in WEIGHT_FILES[part]:
        if (folder / part / name).is_file():
            return folder / part / name
    raise CheckpointError(f"diffusers folder {folder}: {part}/ has none of {list(WEIGHT_FILES[part])}")


def read_diffusers(folder: Path, spec: ModelSpec | None) -> tuple[ModelSpec, dict, CLIPTokenizer, CLIPTokenizer | None]:
    """(spec, our-named weights {"unet", "vae", "text", "text_2" (SDXL base)}, tokenizer,
    tokenizer_2 or None) of a diffusers folder; ``spec`` given replaces what the folder says."""
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a folder without model_index.json: not a diffusers model folder")
    text, tok, text_2 = _text_parts(folder)
    for part in ("unet", "vae", text, tok):
        if not (folder / part).is_dir():
            raise CheckpointError(f"diffusers folder {folder} is missing {part}/")
    tokenizer = read_tokenizer(folder / tok, lambda: CLIPTokenizer.from_folder(folder / tok))
    files = {part: part_file(folder, part) for part in ("unet", "vae", text)}
    stored = False
    if spec is None:
        spec, stored = diffusers_spec(folder, files["unet"], tokenizer)
    u, v = spec.unet, spec.vae
    sds = {
        "unet": convert.unet_diffusers_to_ours(
            read_state_dict(files["unet"]), u.channel_mult, u.num_res_blocks, u.attention_levels
        ),
        "vae": convert.vae_diffusers_to_ours(read_state_dict(files["vae"]), len(v.ch_mult), v.num_res_blocks),
        # SDXL's bigG (the refiner's only tower) keeps its text_projection: its pooled output is projected
        "text": convert.text_transformers_to_ours(read_state_dict(files[text]), keep_projection=text != "text_encoder"),
    }
    tokenizer_2 = None
    if text_2:
        tokenizer_2 = read_tokenizer(folder / "tokenizer_2", lambda: CLIPTokenizer.from_folder(folder / "tokenizer_2"))
        spec = replace(spec, pad_token_2=tokenizer_2.pad_token)
        sds["text_2"] = convert.text_transformers_to_ours(
            read_state_dict(part_file(folder, "text_encoder_2")), keep_projection=True
        )
    if stored:
        check_against_weights(spec, sds, files["unet"])
    return spec, sds, tokenizer, tokenizer_2


def read_diffusers_spec(folder: Path) -> ModelSpec:
    """The spec of a diffusers folder without reading its weights."""
    _, tok, _ = _text_parts(folder)
    tokenizer = read_tokenizer(folder / tok, lambda: CLIPTokenizer.from_folder(folder / tok))
    return diffusers_spec(folder, part_file(folder, "unet"), tokenizer)[0]


def _text_parts(folder: Path) -> tuple[str, str, bool]:
    """(text encoder folder, tokenizer folder, whether a second tower follows) of a diffusers
    folder: SD's text_encoder/; SDXL base's text_encoder/ then text_encoder_2/; SDXL refiner's
    text_encoder_2/ alone (bigG, our spec's only tower)."""
    first, second = (folder / "text_encoder").is_dir(), (folder / "text_encoder_2").is_dir()
    if second and not first:
        return "text_encoder_2", "tokenizer_2", False
    return "text_encoder", "tokenizer", second


def diffusers_spec(folder: Path, unet_file: Path, tokenizer: CLIPTokenizer) -> tuple[ModelSpec, bool]:
    """The spec of a diffusers folder, from its config files (and from our own metadata when we
    wrote the folder: it keeps the name and schedule facts that configs do not carry), and whether
    it came from that metadata."""
    text, _, has_text_2 = _text_parts(folder)
    unet_path, vae_path, text_path = (folder / part / "config.json" for part in ("unet", "vae", text))
    text_2_path = folder / "text_encoder_2" / "config.json"
    unet_json = _read_json(unet_path)
    vae_cfg = _network_config(
        VAEConfig, convert.vae_config_from_diffusers, _read_json(vae_path), vae_path, convert.VAE_DIFFUSERS_KEYS
    )
    text_cfg = _text_config(text_path, projection=text != "text_encoder")
    text_2_cfg = _text_config(text_2_path, projection=True) if has_text_2 else None
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
        check_fields(spec.unet, unet_cfg, "unet", unet_file, str(unet_path))
        check_fields(spec.vae, vae_cfg, "vae", unet_file, str(vae_path))
    else:
        spec = ModelSpec(
            name=f"diffusers:{folder.name}",
            unet=unet_cfg,
            vae=vae_cfg,
            text=text_cfg,
            text_2=text_2_cfg,
            force_zeros_for_empty_prompt=force_zeros,
            text_format="openclip" if text_cfg.activation == "gelu" else "openai",
            prediction_type=prediction_type_from_diffusers(sched, scheduler_path),
            schedule=schedule_from_diffusers(sched, scheduler_path),
            default_size=_default_size(unet_json, unet_path, vae_cfg.downscale),
        )
        check_values(spec, folder)
    if spec.is_sdxl and stored:
        # Our own SDXL folder: the stored towers (SDXL writes every layer), once the configs agree.
        if (spec.text_2 is None) != (text_2_cfg is None):
            raise CheckpointError(
                f"{unet_file}: the stored model spec does not match the model: it has "
                f"{'no' if spec.text_2 is None else 'a'} second text tower, {folder} "
                f"{'has' if has_text_2 else 'has no'} text_encoder_2/"
            )
        check_fields(spec.text, text_cfg, "text", unet_file, str(text_path))
        if text_2_cfg is not None:
            check_fields(spec.text_2, text_2_cfg, "text", unet_file, str(text_2_path), "text_2")
        return replace(spec, pad_token=tokenizer.pad_token), stored
    if spec.is_sdxl:
        # SDXL reads its towers' penultimate layer without the final norm (diffusers' hidden_states[-2])
        sdxl = lambda t: replace(t, skip_layers=1, context_norm=False)  # noqa: E731
        return replace(
            spec, text=sdxl(text_cfg), text_2=text_2_cfg and sdxl(text_2_cfg), pad_token=tokenizer.pad_token
        ), stored
    # transformers runs every layer it has: the folder's text tower never skips layers.
    return replace(spec, text=text_cfg, pad_token=tokenizer.pad_token), stored


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
    weights.convert) type-checks the file's values, then every field is checked against LIMITS
    before anything is built; errors name the file and its key."""
    try:
        fields = read(data)
    except BadFileError:
        raise
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return config_from_dict(cls, fields, str(path), keys)


def _text_config(path: Path, projection: bool) -> CLIPTextConfig:
    """A text tower's config.json; ``projection``: a CLIPTextModelWithProjection (SDXL's bigG)."""
    read = lambda c: convert.text_config_from_transformers(c, with_projection=projection)  # noqa: E731
    return _network_config(CLIPTextConfig, read, _read_json(path), path, convert.TEXT_TRANSFORMERS_KEYS)


def _default_size(unet_json: dict, path: Path, downscale: int) -> int:
    sample_size = unet_json.get("sample_size", 64)
    if type(sample_size) is not int:
        raise CheckpointError(f"{path}: sample_size must be an integer, got {sample_size!r:.60}")
    check_limits("ModelSpec", {"default_size": sample_size * downscale}, str(path), {"default_size": "sample_size"})
    return sample_size * downscale


# --------------------------------------------------------------------------------------------
# Writing.


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_index(spec: ModelSpec) -> dict:
    """model_index.json as diffusers' save_pretrained writes it for the pipeline of ``spec``."""
    clip = ["transformers", "CLIPTextModel"]
    tokenizer = ["transformers", "CLIPTokenizer"]
    index = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None],
    }
    if not spec.is_sdxl:
        pipeline = "StableDiffusionInpaintPipeline" if spec.is_inpaint else "StableDiffusionPipeline"
        return {
            **index,
            "_class_name": pipeline,
            "text_encoder": clip,
            "tokenizer": tokenizer,
            "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
        }
    index.update(
        scheduler=["diffusers", "EulerDiscreteScheduler"],
        image_encoder=[None, None],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer_2=tokenizer,
        force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt,
    )
    if spec.is_refiner:  # bigG alone, conditioned on aesthetic scores
        return {
            **index,
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "requires_aesthetics_score": True,
        }
    pipeline = "StableDiffusionXLInpaintPipeline" if spec.is_inpaint else "StableDiffusionXLPipeline"
    return {**index, "_class_name": pipeline, "text_encoder": clip, "tokenizer": tokenizer}


def write_diffusers(pipe, sds: dict, folder: Path, meta: dict) -> None:
    """Write ``pipe`` (a StableDiffusion) with its our-named weights ``sds`` as a diffusers folder;
    ``meta`` (our spec) goes into the U-Net's weights file."""
    spec = pipe.spec
    u, v = spec.unet, spec.vae
    _write_json(folder / "model_index.json", model_index(spec))
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
    if not spec.is_sdxl:
        _write_text_encoder(folder, "", spec.text, sds["text"], pipe.tokenizer, sdxl=False)
    elif spec.is_refiner:  # the refiner's only tower is bigG: diffusers' text_encoder_2
        _write_text_encoder(folder, "_2", spec.text, sds["text"], pipe.tokenizer, sdxl=True)
    else:
        _write_text_encoder(folder, "", spec.text, sds["text"], pipe.tokenizer, sdxl=True)
        _write_text_encoder(folder, "_2", spec.text_2, sds["text_2"], pipe.tokenizer_2, sdxl=True)
    scheduler = "EulerDiscreteScheduler" if spec.is_sdxl else "PNDMScheduler"
    _write_json(
        folder / "scheduler" / "scheduler_config.json",
        schedule_to_diffusers(spec.schedule, spec.prediction_type, scheduler),
    )


def _write_text_encoder(
    folder: Path, suffix: str, t: CLIPTextConfig, sd: dict[str, torch.Tensor], tok: CLIPTokenizer, sdxl: bool
) -> None:
    """text_encoder{suffix}/ and tokenizer{suffix}/. SD's pipelines use transformers' last hidden
    state, so the layers the spec skips are left out; SDXL's read hidden_states[-2] of every layer."""
    kept = t.layers if sdxl else t.layers - t.skip_layers
    sd = {k: w for k, w in sd.items() if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < kept}
    ids = SDXL_TEXT_IDS if sdxl else {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    _write_json(
        folder / f"text_encoder{suffix}" / "config.json",
        convert.text_config_to_transformers({**t.to_dict(), "layers": kept}, **ids),
    )
    write_safetensors(
        convert.text_ours_to_transformers(sd),
        folder / f"text_encoder{suffix}" / "model.safetensors",
        metadata={"format": "pt"},
    )
    tok.save(folder / f"tokenizer{suffix}")
