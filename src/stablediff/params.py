"""GenerationParams: the one record of "what to generate", shared by the Python API, the CLI, the
web front end, PNG metadata and tests.

Two text forms:

* JSON (``to_json_dict`` / ``from_json_dict``): every field that JSON can hold. In-memory images and
  the ``latents`` tensor cannot be stored; the dict records that they were given (``*_given``
  flags) so a reader knows the file alone does not reproduce the image. Image *paths* are stored.
* AUTOMATIC1111 "infotext" (``to_a1111`` / ``read_a1111``): the ``parameters`` PNG text that the
  popular web UIs read and write, written and read by ``params_a1111`` (its name tables are
  re-exported here).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from PIL import Image

from stablediff.diffusion.schedules import SIGMA_SCHEDULES, SPACINGS
from stablediff.errors import BadFileError
from stablediff.limits import LIMITS
from stablediff.params_a1111 import (  # noqa: F401 (re-exported: the A1111 name tables' old home)
    A1111_AUTOMATIC,
    A1111_DEFAULT_AS,
    A1111_SAMPLERS,
    A1111_SCHEDULES,
    a1111_fields,
    a1111_text,
    parse_a1111,
)
from stablediff.version import __version__

SCHEDULES = SIGMA_SCHEDULES  # the one list: "default" and A1111's schedule types (diffusion/schedules.py)

_JSON_FORMAT = "stablediff.GenerationParams/1"
_LIMITS = LIMITS["GenerationParams"]
_NOT_JSON = ("init_image", "mask", "latents")  # fields with a special JSON form
_SEED_LIMIT = 2**64
# SDXL's micro-conditioning sizes: (height, width) or (top, left) pairs, as diffusers takes them.
_SIZE_PAIRS = ("original_size", "target_size", "negative_original_size", "negative_target_size")
_SIZE_BOUND = 65536  # pixels: beyond any image a model was trained on, and within float32's exact integers


@dataclass
class GenerationParams:
    """Everything that decides one generation (besides the model).

    ``clip_skip`` follows AUTOMATIC1111: 1 = the text encoder's last layer (the normal output),
    2 = the penultimate layer (as "Clip skip: 2" in A1111; diffusers' ``clip_skip=1``), and so on.
    ``seed`` seeds a CPU ``torch.Generator``; ``latents``, when given, replaces the drawn noise: a
    unit-variance tensor ``[batch_size, C, height // 8, width // 8]`` (C = the VAE's latent channels,
    4 for SD1/SD2). ``init_image``/``mask`` are a PIL image or a path; with an ``init_image`` the run
    is img2img (``strength`` in [0, 1] is the fraction of the schedule re-run), with a ``mask`` too
    it is inpainting (white = repaint). ``width``/``height`` of None mean the model's own image size
    (``ModelSpec.default_size``), for img2img and inpainting too (the init image is resized to the
    size used); ``StableDiffusion.resolve_params`` fills them in.

    SDXL's fields, with the defaults of diffusers' SDXL pipelines (ignored by SD 1.x/2.x models):
    ``prompt_2`` / ``negative_prompt_2`` go to the second text encoder (None: the same as
    ``prompt`` / ``negative_prompt``); the micro-conditioning ``original_size``, ``target_size``
    (None: the image size) and ``crops_coords_top_left`` are (height, width) and (top, left) pairs;
    ``negative_original_size`` / ``negative_target_size`` condition the unconditional half (None:
    the same as the conditional one); the refiner's ``aesthetic_score`` / ``negative_aesthetic_score``.
    ``denoising_end`` (in (0, 1)) stops the schedule there and returns the noisy latents for a
    refiner; ``denoising_start`` starts the schedule there from given latents (strength ignored),
    the base + refiner "ensemble of experts" hand-off of diffusers.

    ``spacing`` ("leading", "trailing" or "linspace") replaces the ``timestep_spacing`` of the
    model's scheduler config for this generation, as a diffusers scheduler made with that config
    value; None keeps the model's (or each sampler's own default).
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    sampler: str = "dpmpp_2m"
    schedule: str = "default"
    seed: int = 0
    batch_size: int = 1
    clip_skip: int = 1
    strength: float = 0.75
    init_image: Image.Image | str | os.PathLike[str] | None = None
    mask: Image.Image | str | os.PathLike[str] | None = None
    # Tensors have no single truth value, so == between two params ignores latents (and repr hides them).
    latents: torch.Tensor | None = field(default=None, compare=False, repr=False)
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None
    denoising_end: float | None = None
    spacing: str | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; the pairs are tuples so that a round trip compares equal
        for name in (*_SIZE_PAIRS, "crops_coords_top_left"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def validate(self, valid_samplers: Sequence[str] | None = None) -> GenerationParams:
        """Raise ``ValueError`` (naming the bad value and what is allowed) or return ``self``.

        ``valid_samplers`` defaults to the registry in ``stablediff.diffusion.samplers``.
        """
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
        for name in ("steps", "batch_size", "clip_skip"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("width", "height", "steps", "batch_size"):  # upper bounds: limits.LIMITS
            value, most = getattr(self, name), int(_LIMITS[name].hi)
            if value is not None and value > most:
                raise ValueError(f"{name} must be at most {most}, got {value!r}")
        for name in ("guidance_scale", "guidance_rescale", "strength"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < _SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        if valid_samplers is None:
            from stablediff.diffusion.samplers import SAMPLERS  # lazy: keeps params import light

            valid_samplers = list(SAMPLERS)
        if self.sampler not in valid_samplers:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid choices: {', '.join(sorted(valid_samplers))}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; valid choices: {', '.join(SPACINGS)} (or None)")
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (Image.Image, str, os.PathLike)):
                raise ValueError(f"{name} must be None, a PIL image or a path, got {type(value).__name__}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init_image (inpainting repaints part of a given image)")
        self._check_sdxl()
        if self.init_image is not None and self.denoising_start is None and int(self.steps * self.strength) < 1:
            # diffusers runs int(steps * strength) steps of img2img; zero would return the input.
            raise ValueError(
                f"strength {self.strength} with {self.steps} steps leaves zero steps: need int(steps * strength) >= 1"
            )
        if self.latents is not None:
            self._check_latents()
        return self

    def _check_sdxl(self) -> None:
        for name in ("prompt_2", "negative_prompt_2"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str or None, got {type(getattr(self, name)).__name__}")
        for name in (*_SIZE_PAIRS, "crops_coords_top_left"):
            value, low = getattr(self, name), 0 if name == "crops_coords_top_left" else 1
            if value is None and name != "crops_coords_top_left":
                continue
            if not (
                isinstance(value, tuple)
                and len(value) == 2
                and all(_is_int(v) and low <= v < _SIZE_BOUND for v in value)
            ):
                raise ValueError(f"{name} must be two ints in [{low}, {_SIZE_BOUND}), got {value!r}")
        for name in ("aesthetic_score", "negative_aesthetic_score", "denoising_start", "denoising_end"):
            value = getattr(self, name)
            if (value is not None or "aesthetic" in name) and not (_is_real(value) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("denoising_start", "denoising_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if self.denoising_start is not None and self.denoising_end is not None:
            if self.denoising_start >= self.denoising_end:
                raise ValueError(
                    f"denoising_start {self.denoising_start} must be below denoising_end {self.denoising_end}"
                )

    def with_default_size(self, size: int) -> GenerationParams:
        """A copy with ``size`` for a ``width``/``height`` of None (``self`` when both are set)."""
        if self.width is not None and self.height is not None:
            return self
        return replace(
            self, width=size if self.width is None else self.width, height=size if self.height is None else self.height
        )

    def _check_latents(self) -> None:
        lat = self.latents
        if not isinstance(lat, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor or None, got {type(lat).__name__}")
        # The latent size depends on the model's VAE: the pipeline checks channels and size.
        if lat.ndim != 4 or lat.shape[0] != self.batch_size:
            raise ValueError(f"latents must have shape [batch_size={self.batch_size}, C, h, w], got {list(lat.shape)}")

    # ---- JSON ---------------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready dict. Paths of ``init_image``/``mask`` are kept; in-memory images and
        ``latents`` are stored as ``None`` with ``<name>_given: true``, which marks a record that
        cannot reproduce its image on its own."""
        out: dict[str, Any] = {"format": _JSON_FORMAT}
        for f in fields(self):
            if f.name not in _NOT_JSON:
                out[f.name] = getattr(self, f.name)
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            out[name] = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
            out[f"{name}_given"] = value is not None
        out["latents"] = None
        out["latents_given"] = self.latents is not None
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> GenerationParams:
        """Inverse of ``to_json_dict`` (not validated: call ``validate``). Unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = {"format", "init_image_given", "mask_given", "latents_given"}
        unknown = sorted(set(data) - known - extra)
        if unknown:
            raise ValueError(f"unknown GenerationParams keys {unknown}; known: {sorted(known)}")
        if "prompt" not in data:
            raise ValueError("GenerationParams JSON needs a 'prompt'")
        kwargs = {k: v for k, v in data.items() if k in known and k != "latents"}
        return cls(**kwargs)

    # ---- the PNG record -----------------------------------------------------------------------

    def to_record(
        self,
        model: str | None,
        model_file: str | None,
        model_hash: str | None,
        loras: Sequence[Mapping[str, Any]] = (),
        embeddings: Mapping[str, str | None] | None = None,
        refiner: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``stablediff`` PNG chunk: these params as JSON, the model's name, file and hash, and
        the add-ons used (as ``to_a1111`` takes them): ``loras`` [{name, unet, text, hash, in_prompt}]
        and ``embeddings`` {name: hash}, by name and hash only; ``refiner`` {model, model_file,
        model_hash, switch_at}: the SDXL refiner that took over from ``switch_at`` (None: none).

        A PNG is shared: it carries the *file names* of the model, init image and mask, never a
        folder of the machine that made it (``model_file`` may also be a preset's name).
        """
        params = self.to_json_dict()
        for name in ("init_image", "mask"):
            if params[name] is not None:
                params[name] = file_name(params[name])
        return {
            "params": params,
            "model": model,
            "model_hash": model_hash,
            "model_file": None if model_file is None else file_name(model_file),
            "loras": [{k: u.get(k) for k in ("name", "unet", "text", "hash", "in_prompt")} for u in loras],
            "embeddings": dict(embeddings or {}),
            "refiner": None if refiner is None else _refiner_entry(refiner),
            "version": __version__,
        }

    @classmethod
    def from_record(cls, record: Any, source: str | os.PathLike[str]) -> tuple[GenerationParams, dict[str, Any]]:
        """Read the ``stablediff`` chunk of a stranger's PNG: ``(params, model)``, the params
        validated and ``model`` holding ``"model"``, ``"model_file"`` and ``"model_hash"`` (each a
        str or None; PNGs written before ``model_file`` have an absolute ``model_path``), ``"loras"``
        and ``"refiner"`` (as ``to_record`` takes it, or None).

        Anything malformed or invalid raises BadFileError naming ``source`` and the field.
        """
        if not isinstance(record, dict) or not isinstance(record.get("params"), dict):
            raise BadFileError(f"{source}: the stablediff chunk has no 'params' object")
        model = {"model": record.get("model"), "model_hash": record.get("model_hash")}
        model["model_file"] = record.get("model_file", record.get("model_path"))
        for key, value in model.items():
            if value is not None and not isinstance(value, str):
                raise BadFileError(f"{source}: the stablediff chunk's {key!r} must be a string, got {value!r:.60}")
        model["loras"] = _read_lora_uses(record.get("loras", []), source)
        model["refiner"] = _read_refiner(record.get("refiner"), source)
        data = record["params"]
        if "latents" in data and data["latents"] is not None:
            raise BadFileError(f"{source}: stored latents must be null (a PNG cannot hold them)")
        try:
            params = cls.from_json_dict(data).validate()
        except BadFileError:
            raise
        except ValueError as err:
            raise BadFileError(f"{source}: stored parameters are invalid: {err}") from None
        return params, model

    # ---- AUTOMATIC1111 infotext ---------------------------------------------------------------

    def to_a1111(
        self,
        model_hash: str | None = None,
        model_name: str | None = None,
        seed: int | None = None,
        loras: Sequence[Mapping[str, Any]] = (),
        embeddings: Mapping[str, str | None] | None = None,
        refiner: Mapping[str, Any] | None = None,
    ) -> str:
        """The AUTOMATIC1111 ``parameters`` text for one image (``seed`` overrides ``self.seed``, e.g.
        for the i-th image of a batch), with the LoRAs, embeddings and refiner used (see
        ``params_a1111.a1111_text``). A1111 has no keys for the SDXL micro-conditioning, the second
        prompts or ``spacing``: the ``stablediff`` record keeps them."""
        return a1111_text(self, model_hash, model_name, seed, loras, embeddings, refiner)

    @classmethod
    def from_a1111(cls, text: str) -> GenerationParams:
        """Fields read back from A1111 text, as ``read_a1111`` reads them, except that unknown
        samplers/schedules are kept as written (for ``validate`` to reject) and the prompt is kept
        as it is; images and latents are not part of the text."""
        return cls._from_a1111(text, lenient=False)[0]

    @classmethod
    def read_a1111(cls, text: str) -> tuple[GenerationParams, list[str]]:
        """The parameters of A1111 ``parameters`` text, and one line for each thing in it that they
        do not reproduce.

        "Automatic" (or no "Schedule type", as before A1111 1.9) is the schedule A1111 1.9+ picks
        for the sampler (``A1111_AUTOMATIC``); "DPM++ 2M Karras" (before 1.9) is the sampler and the
        schedule. Listed (nothing is dropped silently): an unknown sampler (replaced by DPM++ 2M) or
        schedule type (replaced by the sampler's "Automatic"); every key that is not a parameter
        here ("Hires upscale", "ADetailer model", "Eta", a nonzero "ENSD", ...); the model, which is
        not looked up by name; A1111's GPU noise ("RNG" other than CPU, or none); hypernetwork tags,
        and any extra-network tag in the negative prompt (removed as A1111 removes them). A prompt's
        ``<lora:...>`` tags stay: the pipeline applies them (looked up in its LoRA folder).
        """
        return cls._from_a1111(text, lenient=True)

    @classmethod
    def from_png(cls, path: str | os.PathLike[str]) -> tuple[GenerationParams, list[str]]:
        """The parameters of a PNG and what they do not reproduce: our ``stablediff`` chunk when the
        PNG has one (``from_record``: nothing unmapped), else A1111's ``parameters`` text
        (``read_a1111``). Raises BadFileError for a PNG with neither, or with invalid values."""
        from stablediff.image import read_png_metadata

        meta = read_png_metadata(path)
        if meta["stablediff"] is not None:
            return cls.from_record(meta["stablediff"], path)[0], []
        if meta["parameters"] is None:
            raise BadFileError(f"{path} carries no generation parameters (neither stablediff's nor A1111's)")
        try:
            params, unmapped = cls.read_a1111(meta["parameters"])
            return params.validate(), unmapped
        except ValueError as err:
            raise BadFileError(f"{path}: A1111 parameters: {err}") from None

    @classmethod
    def _from_a1111(cls, text: str, lenient: bool) -> tuple[GenerationParams, list[str]]:
        fields, unmapped = a1111_fields(text, lenient)
        return cls(**fields), unmapped


def _read_lora_uses(value: Any, source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ``loras`` of a stranger's record, each entry's types checked (BadFileError otherwise)."""
    bad = BadFileError(
        f"{source}: the stablediff chunk's 'loras' must be a list of {{name, unet, text, hash, in_prompt}}"
    )
    if not isinstance(value, list) or len(value) > 64:
        raise bad
    uses = []
    for use in value:
        if not isinstance(use, dict) or not isinstance(use.get("name"), str) or not use["name"]:
            raise bad
        if not all(_is_real(use.get(k)) and math.isfinite(use[k]) for k in ("unet", "text")):
            raise bad
        if not (use.get("hash") is None or isinstance(use["hash"], str)) or not isinstance(use.get("in_prompt"), bool):
            raise bad
        uses.append({k: use[k] for k in ("name", "unet", "text", "hash", "in_prompt")})
    return uses


def _refiner_entry(refiner: Mapping[str, Any]) -> dict[str, Any]:
    entry = {k: refiner.get(k) for k in ("model", "model_file", "model_hash", "switch_at")}
    if entry["model_file"] is not None:
        entry["model_file"] = file_name(entry["model_file"])
    return entry


def _read_refiner(value: Any, source: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``refiner`` of a stranger's record (None when absent), types and range checked."""
    if value is None:
        return None
    bad = BadFileError(
        f"{source}: the stablediff chunk's 'refiner' must be {{model, model_file, model_hash, switch_at}} with "
        "model_file a string and switch_at in (0, 1)"
    )
    if not isinstance(value, dict) or not isinstance(value.get("model_file"), str) or not value["model_file"]:
        raise bad
    if not all(value.get(k) is None or isinstance(value[k], str) for k in ("model", "model_hash")):
        raise bad
    switch = value.get("switch_at")
    if not (_is_real(switch) and 0.0 < switch < 1.0):
        raise bad
    return _refiner_entry(value)


def file_name(path: str | os.PathLike[str]) -> str:
    """The last part of a path written on any system (``C:\\a\\b.png`` and ``/a/b.png`` give ``b.png``)."""
    return re.split(r"[\\/]", os.fspath(path))[-1]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
