"""The AUTOMATIC1111-compatible subset of the API (``/sdapi/v1/...``), translated onto the native
jobs: a txt2img or img2img request becomes one native job (``batch_size * n_iter`` images, image k
with seed + k, as A1111 numbers its seeds), waited for, and answered in A1111's shapes.

A1111 fields this server does not implement are reported: set to anything but their neutral
value they are listed under ``warnings`` in the ``info`` JSON (and logged); a field A1111 does
not have at all is a 422. Departure: a missing width/height is the model's own size (A1111 says
512, the size of SD 1.x), so a client that sends no size gets what the model was trained for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from stablediff.addons import EMBEDDING_SUFFIXES
from stablediff.image import read_png_metadata
from stablediff.lora.tags import LORA_SUFFIXES
from stablediff.params import A1111_SAMPLERS, A1111_SCHEDULES, GenerationParams, parse_a1111
from stablediff.serve.api import manager_of, png_info, switch
from stablediff.serve.jobs import JobManager
from stablediff.serve.security import RequestError, decode_base64, decode_image
from stablediff.serve.store import FINISHED
from stablediff.version import __version__

log = logging.getLogger(__name__)
router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

# A1111's fields we accept but do not implement, with the values that mean "off" (or A1111's default).
_NEUTRAL: dict[str, tuple] = {
    "styles": (None, []),
    "subseed": (None, -1),
    "subseed_strength": (None, 0, 0.0),
    "seed_resize_from_h": (None, -1, 0),
    "seed_resize_from_w": (None, -1, 0),
    "restore_faces": (None, False),
    "tiling": (None, False),
    "eta": (None,),
    "s_min_uncond": (None, 0, 0.0),
    "s_churn": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0),
    "s_tmin": (None, 0, 0.0),
    "s_noise": (None, 1, 1.0),
    "refiner_checkpoint": (None, ""),
    "refiner_switch_at": (None, 0),
    "disable_extra_networks": (None, False),
    "firstpass_image": (None, ""),
    "comments": (None, {}),
    "enable_hr": (None, False),
    "script_name": (None, ""),
    "script_args": (None, []),
    "alwayson_scripts": (None, {}),
    "resize_mode": (None, 0),
    "image_cfg_scale": (None,),
    "mask_blur": (None, 4),
    "mask_blur_x": (None, 4),
    "mask_blur_y": (None, 4),
    "mask_round": (None, True),
    "inpainting_fill": (None, 0, 1),
    "inpainting_mask_invert": (None, 0),
    "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None, ""),
}
# Fields that do not change the image (or only matter when an unsupported feature is on).
_IGNORED = {
    "sampler_index",
    "do_not_save_samples",
    "do_not_save_grid",
    "send_images",
    "save_images",
    "infotext",
    "force_task_id",
    "user",
    "override_settings_restore_afterwards",
    "include_init_images",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_additional_modules",
}
_OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
# lower-case A1111 names, labels and our names -> A1111's labels
_SAMPLER_LABELS = {v.lower(): v for v in A1111_SAMPLERS.values()} | {k: v for k, v in A1111_SAMPLERS.items()}
_SCHEDULE_LABELS = {v.lower(): v for v in A1111_SCHEDULES.values()} | {k: v for k, v in A1111_SCHEDULES.items()}
_SCHEDULE_LABELS["automatic"] = "Automatic"


class Txt2ImgRequest(BaseModel):
    """A1111's txt2img fields (defaults as A1111's, but width/height: the model's own size)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float | None = 0.75


class PngInfoRequest(BaseModel):
    image: str = Field(..., description="base64 PNG")


def _sampler(name: str | None, scheduler: str | None) -> tuple[str, str]:
    """(our sampler, our schedule) from A1111's sampler_name and scheduler. The names are checked
    against A1111's here; what they mean (e.g. "Automatic" = the schedule A1111 picks for the
    sampler, or "DPM++ 2M Karras" from before A1111 1.9) is what ``GenerationParams.from_a1111``
    reads from an infotext, so the API and the PNG text agree."""
    label = name or "DPM++ 2M"
    suffix = ""
    for kind in ("Karras", "Exponential"):
        if label.lower().endswith(" " + kind.lower()) and label[: -len(kind) - 1].lower() in _SAMPLER_LABELS:
            label, suffix = label[: -len(kind) - 1], " " + kind
    if label.lower() not in _SAMPLER_LABELS:
        allowed = ", ".join(A1111_SAMPLERS.values())
        raise RequestError(422, f"sampler_name: unknown sampler {name!r}; allowed: {allowed}")
    text = f"x\nSteps: 1, Sampler: {_SAMPLER_LABELS[label.lower()]}{suffix}"
    if scheduler is not None:
        if scheduler.lower() not in _SCHEDULE_LABELS:
            allowed = ", ".join(["automatic", *(k for k in A1111_SCHEDULES if k != "default")])
            raise RequestError(422, f"scheduler: unknown scheduler {scheduler!r}; allowed: {allowed}")
        text += f", Schedule type: {_SCHEDULE_LABELS[scheduler.lower()]}"
    params = GenerationParams.from_a1111(text)
    return params.sampler, params.schedule


def _check_extras(body: BaseModel) -> list[str]:
    warnings = []
    for name, value in (body.model_extra or {}).items():
        if name in _IGNORED:
            continue
        if name not in _NEUTRAL:
            raise RequestError(422, f"{name}: not an A1111 field this server knows (see docs/serve.md)")
        if value not in _NEUTRAL[name]:
            warnings.append(f"{name}={value!r} is not supported and was ignored")
    return warnings


def _values(manager: JobManager, body: Txt2ImgRequest) -> tuple[dict[str, Any], list[str], str | None]:
    """Native job fields, warnings, and the model the request asks for (override_settings)."""
    warnings = _check_extras(body)
    sampler, schedule = _sampler(body.sampler_name, body.scheduler)
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise RequestError(422, f"{name}: must be >= 1, got {getattr(body, name)}")
    values: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "sampler": sampler,
        "schedule": schedule,
        "seed": None if body.seed == -1 else body.seed,
        "batch_size": body.batch_size * body.n_iter,
        "width": body.width,
        "height": body.height,
        "clip_skip": manager.a1111_options.get("CLIP_stop_at_last_layers", 1),
    }
    if body.denoising_strength is not None:
        values["strength"] = body.denoising_strength
    model = None
    for key, value in (body.override_settings or {}).items():
        if key == "sd_model_checkpoint":
            model = str(value)
        elif key == "CLIP_stop_at_last_layers":
            values["clip_skip"] = value
        else:
            warnings.append(f"override_settings.{key} is not supported and was ignored")
    for text in warnings:
        log.warning("A1111 request: %s", text)
    return values, warnings, model


async def _run(request: Request, body: Txt2ImgRequest, init=None, mask=None) -> dict[str, Any]:
    """Queue the job (in a worker thread of the server: decoding and validation take a moment),
    then wait for it without holding a thread, as A1111's synchronous calls do."""
    manager = manager_of(request)
    values, warnings, model = _values(manager, body)
    previous = manager.current.entry.name
    if model is not None:
        await run_in_threadpool(switch, manager, model, "override_settings.sd_model_checkpoint")
    try:
        job = await run_in_threadpool(manager.submit, values, init, mask)
        while job.status not in FINISHED and not manager.stopping:
            await asyncio.sleep(0.05)
            job = manager.store.get(job.id)
    finally:
        if model is not None and body.override_settings_restore_afterwards:
            await run_in_threadpool(switch, manager, previous, "sd_model_checkpoint")
    if job.status == "failed":
        raise RequestError(500, f"generation failed: {job.error}")
    if job.status not in FINISHED:
        raise RequestError(503, "the server is shutting down; the job runs again at the next start")
    images = [base64.b64encode((manager.outputs / name).read_bytes()).decode() for name in job.images]
    parameters = body.model_dump()
    for name in ("init_images", "mask"):
        if name in parameters:
            parameters[name] = None  # as A1111: the images are not echoed back
    return {"images": images, "parameters": parameters, "info": json.dumps(_info(manager, job, warnings))}


def _info(manager: JobManager, job, warnings: list[str]) -> dict[str, Any]:
    params = manager.params_of(job)  # stored with the size the job ran at
    worker = next((w for w in manager.workers if w.entry.name == job.model), None)
    model_name = worker.model_name if worker else job.model
    digest = worker.digest if worker else None
    seeds = [params.seed + k for k in range(params.batch_size)]
    written = [manager.outputs / name for name in job.images]
    if written and all(path.is_file() for path in written):  # the text in the PNGs: LoRA hashes and all
        texts = [read_png_metadata(path)["parameters"] for path in written]
    else:
        texts = [params.to_a1111(model_hash=digest, model_name=model_name, seed=s) for s in seeds]
    return {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * len(seeds),
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * len(seeds),
        "seed": params.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": A1111_SAMPLERS.get(params.sampler, params.sampler),
        "scheduler": A1111_SCHEDULES.get(params.schedule, "Automatic"),
        "cfg_scale": params.guidance_scale,
        "steps": params.steps,
        "batch_size": params.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": digest,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.strength if params.init_image is not None else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts[: len(job.images)],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": params.clip_skip,
        "is_using_inpainting_conditioning": bool(worker and worker.pipe.spec.is_inpaint),
        "version": f"stablediff {__version__}",
        "job_id": job.id,
        "status": job.status,
        "warnings": warnings,
    }


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, request: Request) -> dict[str, Any]:
    return await _run(request, body)


@router.post("/img2img")
async def img2img(body: Img2ImgRequest, request: Request) -> dict[str, Any]:
    config = manager_of(request).config
    if not body.init_images:
        raise RequestError(422, "init_images: one base64 image is required")
    if len(body.init_images) > 1:
        raise RequestError(422, f"init_images: one image is supported, got {len(body.init_images)}")
    init = await run_in_threadpool(_decode, body.init_images[0], "init_images[0]", config, False)
    mask = await run_in_threadpool(_decode, body.mask, "mask", config, True) if body.mask else None
    return await _run(request, body, init, mask)


def _decode(text: str, field: str, config, mask: bool):
    return decode_image(decode_base64(text, field), field, config, mask=mask)


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    manager = manager_of(request)
    job_id = manager.running_job()
    state = manager.progress.get(job_id) if job_id else None
    queued = manager.pending()
    result: dict[str, Any] = {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": {
            "skipped": False,
            "interrupted": bool(job_id and job_id in manager.cancel_requested),
            "stopping_generation": False,
            "job": f"task({job_id})" if job_id else "",
            "job_count": queued + (1 if job_id else 0),
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        },
        "current_image": None,
        "textinfo": None,
        "current_task": job_id,
    }
    if state is not None:
        result["progress"] = state.step / state.total if state.total else 0.0
        result["eta_relative"] = state.eta() or 0.0
        result["state"]["sampling_step"] = state.step
        result["state"]["sampling_steps"] = state.total
        if state.preview is not None and not skip_current_image:
            result["current_image"] = base64.b64encode(state.preview).decode()
    return result


@router.post("/interrupt")
def interrupt(request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    job_id = manager.running_job()
    if job_id:
        manager.cancel(job_id)
    return {}


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    return [{"name": label, "aliases": [name], "options": {}} for name, label in A1111_SAMPLERS.items()]


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    rho = {"karras": 7.0, "polyexponential": 1.0}
    entries = [("automatic", "Automatic")] + [(k, v) for k, v in A1111_SCHEDULES.items() if k != "default"]
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": rho.get(name, -1), "need_inner_model": False}
        for name, label in entries
    ]


@router.get("/loras")
def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRA files of --lora-dir, as A1111 lists them (``path`` relative to that folder)."""
    folder = manager_of(request).config.lora_dir
    files = _files(folder, LORA_SUFFIXES)
    return [{"name": p.stem, "alias": p.stem, "path": str(p.relative_to(folder)), "metadata": {}} for p in files]


@router.get("/embeddings")
def embeddings(request: Request) -> dict[str, Any]:
    """The embeddings: those loaded (shape and vectors) and the files of --embeddings-dir not yet
    read (A1111's "skipped" holds those it could not use; here they are loaded when a prompt names them)."""
    manager = manager_of(request)
    loaded = {
        token: {"step": e.step, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": e.dim, "vectors": len(e)}
        for token, e in manager.current.pipe.embeddings.items()
    }
    unread = [p.stem for p in _files(manager.config.embeddings_dir, EMBEDDING_SUFFIXES) if p.stem not in loaded]
    return {"loaded": loaded, "skipped": {name: {} for name in unread}}


def _files(folder, suffixes: tuple[str, ...]) -> list:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def _title(manager: JobManager, entry) -> str:
    worker = next((w for w in manager.workers if w.entry == entry), None)
    digest = worker.digest if worker else None
    return f"{entry.name} [{digest}]" if digest else entry.name


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict[str, Any]]:
    manager = manager_of(request)
    return [
        {
            "title": _title(manager, e),
            "model_name": e.name.rsplit(".", 1)[0] if e.kind == "file" else e.name,
            "hash": next((w.digest for w in manager.workers if w.entry == e), None),
            "sha256": None,
            "filename": e.name,
            "config": None,
        }
        for e in manager.entries
    ]


@router.get("/options")
def get_options(request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    return {
        "sd_model_checkpoint": _title(manager, manager.current.entry),
        "CLIP_stop_at_last_layers": manager.a1111_options.get("CLIP_stop_at_last_layers", 1),
        "samples_format": "png",
    }


@router.post("/options")
def set_options(body: dict[str, Any], request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    unknown = sorted(set(body) - set(_OPTIONS))
    if unknown:
        raise RequestError(422, f"options {unknown} are not supported; supported: {', '.join(_OPTIONS)}")
    if "CLIP_stop_at_last_layers" in body:
        value = body["CLIP_stop_at_last_layers"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(422, f"CLIP_stop_at_last_layers: an int >= 1, got {value!r}")
    if "sd_model_checkpoint" in body:
        switch(manager, str(body["sd_model_checkpoint"]), "sd_model_checkpoint")
    if "CLIP_stop_at_last_layers" in body:
        manager.a1111_options["CLIP_stop_at_last_layers"] = body["CLIP_stop_at_last_layers"]
    return {}


@router.post("/png-info")
def read_png_info(body: PngInfoRequest, request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    data = decode_base64(body.image, "image")
    found = png_info(data, manager.config)
    text = found["parameters"]
    if text is None and found["params"] is not None:
        text = GenerationParams.from_json_dict(found["params"]).to_a1111()
    parameters: dict[str, Any] = {}
    if text:
        parameters = dict(parse_a1111(text))
        if "Size" in parameters and "x" in parameters["Size"]:
            parameters["Size-1"], parameters["Size-2"] = parameters["Size"].split("x", 1)
    return {"info": text or "", "items": {"parameters": text} if text else {}, "parameters": parameters}
