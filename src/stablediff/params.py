"""GenerationParams: the one record of "what to generate", shared by the Python API, the CLI, the
web front end, PNG metadata and tests.

Two text forms:

* JSON (``to_json_dict`` / ``from_json_dict``): every field that JSON can hold. In-memory images and
  the ``latents`` tensor cannot be stored; the dict records that they were given (``*_given``
  flags) so a reader knows the file alone does not reproduce the image. Image *paths* are stored.
* AUTOMATIC1111 "infotext" (``to_a1111`` / ``parse_a1111``): the ``parameters`` PNG text that the
  popular web UIs read and write, e.g.::

      a cat
      Negative prompt: blurry
      Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, ...
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from PIL import Image

from stablediff.diffusion.schedules import SIGMA_SCHEDULES
from stablediff.errors import BadFileError
from stablediff.limits import LIMITS
from stablediff.version import __version__

SCHEDULES = SIGMA_SCHEDULES  # the one list: "default" and A1111's schedule types (diffusion/schedules.py)

# Our sampler names -> AUTOMATIC1111's display names (its "Sampler:" field).
A1111_SAMPLERS = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "lms": "LMS",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2s_a": "DPM++ 2S a",
    "ddim": "DDIM",
    "plms": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
    "ddpm": "DDPM",
}
# Our schedules -> AUTOMATIC1111's "Schedule type" labels (A1111 1.10, modules/sd_schedulers.py).
A1111_SCHEDULES = {
    "karras": "Karras",
    "exponential": "Exponential",
    "uniform": "Uniform",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "polyexponential": "Polyexponential",
}
# What "Schedule type: Automatic" (or none) means in A1111 1.9+: the "scheduler" option of the
# sampler's entry in modules/sd_samplers_kdiffusion.py, or, without one, the model's own
# get_sigmas(n), which is "Uniform". A1111's DDIM, PLMS and UniPC are timestep samplers that ignore
# the schedule type (timesteps 1 + k * (1000 // steps), our "default" for DDIM/PLMS); its LCM spaces
# its own 50-step grid. Those four (and DDPM, which A1111 lacks) read as our "default".
A1111_AUTOMATIC = {
    "dpmpp_2m": "karras",
    "dpmpp_sde": "karras",
    "dpmpp_2s_a": "karras",
    "dpm2": "karras",
    "dpmpp_2m_sde": "exponential",
    "euler_a": "uniform",
    "euler": "uniform",
    "lms": "uniform",
    "heun": "uniform",
    "ddim": "default",
    "plms": "default",
    "unipc": "default",
    "lcm": "default",
    "ddpm": "default",
}
# Our "default" schedule (each sampler's diffusers spacing) written as the A1111 type with the same
# sigmas, or the closest one (max. relative sigma difference at 4..100 steps in the comments).
A1111_DEFAULT_AS = {
    # the Euler family: linspace(999, 0, n) timesteps, as "Uniform"; diffusers interpolates sigma
    # linearly at fractional timesteps, k-diffusion log-linearly (8.5e-5)
    "euler": "uniform",
    "euler_a": "uniform",
    "heun": "uniform",
    "lms": "uniform",
    "dpm2": "uniform",  # and A1111's DPM2 drops the penultimate sigma: not reproducible there
    "dpmpp_2s_a": "uniform",
    "dpmpp_sde": "uniform",  # k-diffusion's own discretisation: equal
    # DPM-Solver/UniPC: round(linspace(0, 999, n + 1)) without t = 0; "SGM Uniform" is that linspace
    # unrounded (4.8e-3). No A1111 type rounds timesteps.
    "dpmpp_2m": "sgm_uniform",
    "dpmpp_2m_sde": "sgm_uniform",
    "unipc": "sgm_uniform",
    # "leading" timesteps 1 + k * (1000 // n): "DDIM" (equal when n divides 1000; A1111's DDIM and
    # PLMS samplers use these timesteps whatever the schedule type)
    "ddim": "ddim",
    "plms": "ddim",
    "ddpm": "ddim",
    # LCM's distillation grid has no A1111 type; A1111's LCM spaces its own 50-step grid for
    # "Uniform" (= its "Automatic"), the closest value
    "lcm": "uniform",
}
# A1111's timestep samplers, which ignore "Schedule type" (see A1111_AUTOMATIC).
_A1111_TIMESTEP_SAMPLERS = ("ddim", "plms", "unipc")
# A1111 keys that are read, and keys that describe the file rather than the generation.
_A1111_READ = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"}
_A1111_READ |= {"Denoising strength", "Clip skip", "CFG Rescale", "RNG", "ENSD", "Model", "Model hash", "Version"}
_A1111_READ |= {"Lora hashes", "TI hashes"}  # the LoRA tags and embedding names of the prompt say what is used
# A1111's extra networks, removed before encoding as A1111 does: a prompt's <lora:...> tags apply here
# too (the pipeline reads them), so only hypernetworks are taken out of it; a negative prompt loses all
_EXTRA_NETWORK = {
    "prompt": re.compile(r"<hypernet:[^>]*>"),
    "negative_prompt": re.compile(r"<(?:lora|lyco|hypernet):[^>]*>"),
}

_JSON_FORMAT = "stablediff.GenerationParams/1"
_LIMITS = LIMITS["GenerationParams"]
_NOT_JSON = ("init_image", "mask", "latents")  # fields with a special JSON form
_SEED_LIMIT = 2**64
# One "Key: value" item of the infotext's last line. A value is either a JSON string in double
# quotes (A1111 quotes values that contain "," ":" or a newline) or runs to the next comma.
_ITEM = re.compile(r'\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')


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
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (Image.Image, str, os.PathLike)):
                raise ValueError(f"{name} must be None, a PIL image or a path, got {type(value).__name__}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init_image (inpainting repaints part of a given image)")
        if self.init_image is not None and int(self.steps * self.strength) < 1:
            # diffusers runs int(steps * strength) steps of img2img; zero would return the input.
            raise ValueError(
                f"strength {self.strength} with {self.steps} steps leaves zero steps: need int(steps * strength) >= 1"
            )
        if self.latents is not None:
            self._check_latents()
        return self

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
    ) -> dict[str, Any]:
        """The ``stablediff`` PNG chunk: these params as JSON, the model's name, file and hash, and
        the add-ons used (as ``to_a1111`` takes them): ``loras`` [{name, unet, text, hash, in_prompt}]
        and ``embeddings`` {name: hash}, by name and hash only.

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
            "version": __version__,
        }

    @classmethod
    def from_record(cls, record: Any, source: str | os.PathLike[str]) -> tuple[GenerationParams, dict[str, Any]]:
        """Read the ``stablediff`` chunk of a stranger's PNG: ``(params, model)``, the params
        validated and ``model`` holding ``"model"``, ``"model_file"`` and ``"model_hash"`` (each a
        str or None; PNGs written before ``model_file`` have an absolute ``model_path``).

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
    ) -> str:
        """The AUTOMATIC1111 ``parameters`` text for one image (``seed`` overrides ``self.seed``,
        e.g. for the i-th image of a batch). Fields follow A1111's order; ``None`` ones are left out
        as A1111 does. Keys A1111 lacks: "CFG Rescale" (the CFG_Rescale_webui extension's key).

        ``loras``: the LoRAs used (``lora_uses``: name, unet and text weights, hash, whether a prompt
        tag named it); those loaded outside the prompt are written into it as ``<lora:name:w>`` tags,
        A1111's only way to name them, and every one goes in "Lora hashes". ``embeddings``: the
        textual-inversion names in the prompts and their hashes ("TI hashes").

        "Schedule type" is always a concrete A1111 type, never "Automatic" (which A1111 reads as the
        sampler's own default): "default" is written as ``A1111_DEFAULT_AS[sampler]``. "RNG: CPU":
        the noise is drawn from a CPU generator seeded with the seed, as A1111 draws it with that option.
        """
        schedule = A1111_DEFAULT_AS.get(self.sampler, self.schedule) if self.schedule == "default" else self.schedule
        items: dict[str, Any] = {
            "Steps": self.steps,
            "Sampler": A1111_SAMPLERS.get(self.sampler, self.sampler),
            "Schedule type": A1111_SCHEDULES.get(schedule, schedule),
            "CFG scale": float(self.guidance_scale),
            "Seed": self.seed if seed is None else seed,
            "Size": None if self.width is None or self.height is None else f"{self.width}x{self.height}",
            "Model hash": model_hash,
            "Model": model_name,
            "Denoising strength": float(self.strength) if self.init_image is not None else None,
            "Clip skip": self.clip_skip if self.clip_skip > 1 else None,  # A1111 omits the default
            "RNG": "CPU",
            "CFG Rescale": float(self.guidance_rescale) if self.guidance_rescale > 0 else None,
            "Lora hashes": ", ".join(f"{u['name']}: {u['hash']}" for u in loras if u.get("hash")) or None,
            "TI hashes": ", ".join(f"{n}: {h}" for n, h in (embeddings or {}).items() if h) or None,
            "Version": f"stablediff {__version__}",
        }
        line = ", ".join(f"{k}: {_quote(v)}" for k, v in items.items() if v is not None)
        tags = "".join(f" {_lora_tag(u)}" for u in loras if not u.get("in_prompt"))
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{tags}{negative}\n{line}".strip()

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
        info = parse_a1111(text)
        unmapped: list[str] = []
        samplers = {v: k for k, v in A1111_SAMPLERS.items()}
        labels = {**{v: k for k, v in A1111_SCHEDULES.items()}, **{k: k for k in A1111_SCHEDULES}}
        labels["SGMUniform"] = "sgm_uniform"  # A1111's alias
        label, schedule_label = info.get("Sampler", "DPM++ 2M"), info.get("Schedule type", "Automatic")
        for suffix in ("Karras", "Exponential"):  # before A1111 1.9: "DPM++ 2M Karras"
            if label.endswith(" " + suffix) and label[: -len(suffix) - 1] in samplers:
                label, schedule_label = label[: -len(suffix) - 1], suffix
        sampler = samplers.get(label, label)
        if sampler not in A1111_AUTOMATIC and lenient:
            unmapped.append(f"Sampler: {label} (not available here; DPM++ 2M is used)")
            sampler = "dpmpp_2m"
        if sampler in _A1111_TIMESTEP_SAMPLERS or (sampler == "lcm" and schedule_label in ("Automatic", "Uniform")):
            schedule = "default"  # A1111 ignores the schedule type there (see A1111_AUTOMATIC)
        elif schedule_label == "Automatic":
            schedule = A1111_AUTOMATIC.get(sampler, schedule_label)
        else:
            schedule = labels.get(schedule_label, schedule_label)
            if schedule not in A1111_SCHEDULES and lenient:
                schedule = A1111_AUTOMATIC[sampler]
                shown = A1111_SCHEDULES.get(schedule, "the sampler's own")
                unmapped.append(f"Schedule type: {schedule_label} (not available here; {shown} is used)")
        prompts = {"prompt": info["Prompt"], "negative_prompt": info["Negative prompt"]}
        if lenient:
            for name, key in (("prompt", "Prompt"), ("negative_prompt", "Negative prompt")):
                for tag in _EXTRA_NETWORK[name].findall(prompts[name]):
                    unmapped.append(f"{key}: {tag} (not supported here; the tag is removed)")
                prompts[name] = _EXTRA_NETWORK[name].sub("", prompts[name])
        params = cls(**prompts, sampler=sampler, schedule=schedule)
        conversions = {
            "Steps": ("steps", int),
            "CFG scale": ("guidance_scale", float),
            "Seed": ("seed", int),
            "Clip skip": ("clip_skip", int),
            "Denoising strength": ("strength", float),
            "CFG Rescale": ("guidance_rescale", float),
        }
        for key, (name, kind) in conversions.items():
            if key in info:
                try:
                    setattr(params, name, kind(info[key]))
                except ValueError:
                    raise ValueError(f"A1111 field {key!r} has a bad value {info[key]!r}") from None
        if "Size" in info:
            match = re.fullmatch(r"(\d+)x(\d+)", info["Size"])
            if match is None:
                raise ValueError(f"A1111 field 'Size' must be WIDTHxHEIGHT, got {info['Size']!r}")
            params.width, params.height = int(match[1]), int(match[2])
        if lenient:
            unmapped += _a1111_unread(info)
        return params, unmapped


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


def _a1111_unread(info: Mapping[str, str]) -> list[str]:
    """What ``read_a1111`` lists besides the sampler, schedule and prompts (see there)."""
    out = []
    if "Model" in info or "Model hash" in info:
        name = info.get("Model", "?") + (f", hash {info['Model hash']}" if "Model hash" in info else "")
        out.append(f"Model: {name} (models are not looked up by name)")
    rng = info.get("RNG", "GPU")  # A1111 writes no RNG for its default, the GPU
    if rng != "CPU":
        out.append(f"RNG: {rng} (A1111 drew the noise on the {rng}; here it comes from a CPU generator, as RNG: CPU)")
    if info.get("ENSD", "0") != "0":
        out.append(f"ENSD: {info['ENSD']} (A1111's eta noise seed delta is not supported)")
    out += [f"{key}: {value} (not supported; ignored)" for key, value in info.items() if key not in _A1111_READ]
    return out


def parse_a1111(text: str) -> dict[str, str]:
    """Read A1111 ``parameters`` text: ``{"Prompt", "Negative prompt", <key>: <value>...}``, every
    value a str, quoted values unquoted (so commas and colons inside them survive).

    As in A1111, the last line is the settings line only if it holds at least 3 "Key: value" items;
    otherwise it belongs to the prompt. Lines from "Negative prompt:" on are the negative prompt.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_ITEM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _ITEM.findall(last):
        out[key] = _unquote(value.strip())
    return out


def _lora_tag(use: Mapping[str, Any]) -> str:
    """A1111's tag for a LoRA use: ``<lora:name:w>``, or ``<lora:name:text:unet>`` when they differ."""
    unet, text = float(use.get("unet", 1.0)), float(use.get("text", use.get("unet", 1.0)))
    return f"<lora:{use['name']}:{text:g}>" if unet == text else f"<lora:{use['name']}:{text:g}:{unet:g}>"


def file_name(path: str | os.PathLike[str]) -> str:
    """The last part of a path written on any system (``C:\\a\\b.png`` and ``/a/b.png`` give ``b.png``)."""
    return re.split(r"[\\/]", os.fspath(path))[-1]


def _quote(value: object) -> str:
    """A1111's rule: a value containing "," ":" or a newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text  # A1111 also keeps a malformed quoted value as written
        return value if isinstance(value, str) else text
    return text


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
