"""AUTOMATIC1111's "infotext", the ``parameters`` PNG text that the popular web UIs read and write::

    a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, ...

The name tables between our samplers/schedules and A1111's, writing (``a1111_text``) and reading
(``parse_a1111``, ``a1111_fields``). ``GenerationParams.to_a1111`` / ``from_a1111`` /
``read_a1111`` are the public face; this module sees a params object only through its fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from stablediff.version import __version__

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
_A1111_READ |= {"Refiner", "Refiner switch at"}  # listed by _a1111_unread with what to pass instead
# A1111's extra networks, removed before encoding as A1111 does: a prompt's <lora:...> tags apply here
# too (the pipeline reads them), so only hypernetworks are taken out of it; a negative prompt loses all
_EXTRA_NETWORK = {
    "prompt": re.compile(r"<hypernet:[^>]*>"),
    "negative_prompt": re.compile(r"<(?:lora|lyco|hypernet):[^>]*>"),
}

# One "Key: value" item of the infotext's last line. A value is either a JSON string in double
# quotes (A1111 quotes values that contain "," ":" or a newline) or runs to the next comma.
_ITEM = re.compile(r'\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')


def a1111_text(
    p: Any,
    model_hash: str | None = None,
    model_name: str | None = None,
    seed: int | None = None,
    loras: Sequence[Mapping[str, Any]] = (),
    embeddings: Mapping[str, str | None] | None = None,
    refiner: Mapping[str, Any] | None = None,
) -> str:
    """The AUTOMATIC1111 ``parameters`` text for one image (``seed`` overrides ``p.seed``,
    e.g. for the i-th image of a batch). Fields follow A1111's order; ``None`` ones are left out
    as A1111 does. Keys A1111 lacks: "CFG Rescale" (the CFG_Rescale_webui extension's key).

    ``loras``: the LoRAs used (``lora_uses``: name, unet and text weights, hash, whether a prompt
    tag named it); those loaded outside the prompt are written into it as ``<lora:name:w>`` tags,
    A1111's only way to name them, and every one goes in "Lora hashes". ``embeddings``: the
    textual-inversion names in the prompts and their hashes ("TI hashes"). ``refiner``: the SDXL
    refiner that took over (``model``, ``model_hash``, ``switch_at``), written as A1111 writes its
    refiner: ``Refiner: NAME [hash], Refiner switch at: 0.8``.

    "Schedule type" is always a concrete A1111 type, never "Automatic" (which A1111 reads as the
    sampler's own default): "default" is written as ``A1111_DEFAULT_AS[sampler]``. "RNG: CPU":
    the noise is drawn from a CPU generator seeded with the seed, as A1111 draws it with that option.
    """
    schedule = A1111_DEFAULT_AS.get(p.sampler, p.schedule) if p.schedule == "default" else p.schedule
    items: dict[str, Any] = {
        "Steps": p.steps,
        "Sampler": A1111_SAMPLERS.get(p.sampler, p.sampler),
        "Schedule type": A1111_SCHEDULES.get(schedule, schedule),
        "CFG scale": float(p.guidance_scale),
        "Seed": p.seed if seed is None else seed,
        "Size": None if p.width is None or p.height is None else f"{p.width}x{p.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Denoising strength": float(p.strength) if p.init_image is not None else None,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,  # A1111 omits the default
        "RNG": "CPU",
        "CFG Rescale": float(p.guidance_rescale) if p.guidance_rescale > 0 else None,
        "Lora hashes": ", ".join(f"{u['name']}: {u['hash']}" for u in loras if u.get("hash")) or None,
        "TI hashes": ", ".join(f"{n}: {h}" for n, h in (embeddings or {}).items() if h) or None,
        "Refiner": None if refiner is None else _checkpoint_title(refiner["model"], refiner.get("model_hash")),
        "Refiner switch at": None if refiner is None else float(refiner["switch_at"]),
        "Version": f"stablediff {__version__}",
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in items.items() if v is not None)
    tags = "".join(f" {_lora_tag(u)}" for u in loras if not u.get("in_prompt"))
    negative = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
    return f"{p.prompt}{tags}{negative}\n{line}".strip()


def a1111_fields(text: str, lenient: bool) -> tuple[dict[str, Any], list[str]]:
    """The GenerationParams fields of A1111 text and what they do not reproduce (``lenient``:
    see ``GenerationParams.read_a1111``; otherwise unknown names are kept as written)."""
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
    fields: dict[str, Any] = {**prompts, "sampler": sampler, "schedule": schedule}
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
                fields[name] = kind(info[key])
            except ValueError:
                raise ValueError(f"A1111 field {key!r} has a bad value {info[key]!r}") from None
    if "Size" in info:
        match = re.fullmatch(r"(\d+)x(\d+)", info["Size"])
        if match is None:
            raise ValueError(f"A1111 field 'Size' must be WIDTHxHEIGHT, got {info['Size']!r}")
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    if lenient:
        unmapped += _a1111_unread(info)
    return fields, unmapped


def _a1111_unread(info: Mapping[str, str]) -> list[str]:
    """What ``read_a1111`` lists besides the sampler, schedule and prompts (see there)."""
    out = []
    if "Model" in info or "Model hash" in info:
        name = info.get("Model", "?") + (f", hash {info['Model hash']}" if "Model hash" in info else "")
        out.append(f"Model: {name} (models are not looked up by name)")
    if "Refiner" in info:
        switch = info.get("Refiner switch at", "0.8")
        out.append(
            f"Refiner: {info['Refiner']} (models are not looked up by name; pass --refiner FILE --switch-at {switch})"
        )
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


def _checkpoint_title(name: str, digest: str | None) -> str:
    """A1111's short title of a checkpoint: ``name [hash]`` (the name alone without a hash)."""
    return name if digest is None else f"{name} [{digest}]"


def _lora_tag(use: Mapping[str, Any]) -> str:
    """A1111's tag for a LoRA use: ``<lora:name:w>``, or ``<lora:name:text:unet>`` when they differ."""
    unet, text = float(use.get("unet", 1.0)), float(use.get("text", use.get("unet", 1.0)))
    return f"<lora:{use['name']}:{text:g}>" if unet == text else f"<lora:{use['name']}:{text:g}:{unet:g}>"


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
