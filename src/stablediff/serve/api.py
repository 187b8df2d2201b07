"""The native JSON API (documented in the OpenAPI schema at /docs and /openapi.json).

POST /api/jobs                    create a job (JSON; init_image and mask as base64)
POST /api/jobs/multipart          the same from a form: `params` (JSON text), files `init_image`, `mask`
GET  /api/jobs?offset=&limit=     jobs, newest first
GET  /api/jobs/{id}               one job (with its progress while running)
POST /api/jobs/{id}/cancel        cancel (a queued job is dropped, a running one stops at the next step)
GET  /api/jobs/{id}/events        progress as Server-Sent Events, with a preview every few steps
GET  /api/jobs/{id}/images/{n}    the n-th image (PNG with its parameters)
POST /api/png-info                the parameters of an uploaded PNG (ours or A1111's)
GET  /api/models, POST /api/models   list the models, switch the current one
GET  /api/options                 the samplers and schedules a job may name, the defaults, the model's size
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from stablediff.params import A1111_SAMPLERS, A1111_SCHEDULES, SCHEDULES, GenerationParams
from stablediff.serve.jobs import JobManager
from stablediff.serve.security import RequestError, decode_base64, decode_image
from stablediff.serve.store import FINISHED

router = APIRouter(prefix="/api", tags=["native"])
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobRequest(BaseModel):
    """GenerationParams fields; seed None or -1 draws a random seed (stored with the job)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str = ""
    width: int | None = Field(None, description="a multiple of 8; default: the model's own size")
    height: int | None = Field(None, description="a multiple of 8; default: the model's own size")
    steps: int = 20
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    sampler: str = "dpmpp_2m"
    schedule: str = "default"
    seed: int | None = Field(None, description="None or -1: random, drawn once and stored")
    batch_size: int = 1
    clip_skip: int = 1
    strength: float = 0.75
    init_image: str | None = Field(None, description="img2img: base64 PNG/JPEG (a data: URL prefix is allowed)")
    mask: str | None = Field(None, description="inpainting: base64 mask image, white = repaint, same size as init")


class ModelSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


def manager_of(request: Request) -> JobManager:
    return request.app.state.manager


def job_view(manager: JobManager, job) -> dict[str, Any]:
    view = job.to_dict()
    progress = manager.progress.get(job.id)
    view["progress"] = progress.to_dict() if progress is not None else None
    return view


def submit_request(manager: JobManager, body: JobRequest) -> dict[str, Any]:
    values = body.model_dump(exclude={"init_image", "mask"})
    config = manager.config
    init = decode_image(decode_base64(body.init_image, "init_image"), "init_image", config) if body.init_image else None
    mask = decode_image(decode_base64(body.mask, "mask"), "mask", config, mask=True) if body.mask else None
    if mask is not None and init is None:
        raise RequestError(422, "mask: a mask needs an init_image (inpainting repaints part of a given image)")
    return job_view(manager, manager.submit(values, init, mask))


def get_job(manager: JobManager, job_id: str):
    job = manager.store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise RequestError(404, f"no job {job_id!r}")
    return job


@router.post("/jobs", status_code=201, summary="Create a job (txt2img, img2img, inpainting)")
def create_job(body: JobRequest, request: Request) -> dict[str, Any]:
    return submit_request(manager_of(request), body)


@router.post("/jobs/multipart", status_code=201, summary="Create a job from a form with image files")
def create_job_multipart(
    request: Request,
    params: Annotated[str, Form(description="the JobRequest fields as JSON text (without images)")],
    init_image: Annotated[UploadFile | None, File()] = None,
    mask: Annotated[UploadFile | None, File()] = None,
) -> dict[str, Any]:
    manager = manager_of(request)
    try:
        values = json.loads(params)
    except json.JSONDecodeError as err:
        raise RequestError(422, f"params: not valid JSON ({err})") from None
    if not isinstance(values, dict) or "init_image" in values or "mask" in values:
        raise RequestError(422, "params: a JSON object of JobRequest fields, images sent as files")
    try:
        body = JobRequest(**values)
    except ValueError as err:
        raise RequestError(422, f"params: {err}") from None
    config = manager.config
    init = decode_image(_read(init_image, config), "init_image", config) if init_image else None
    mask_image = decode_image(_read(mask, config), "mask", config, mask=True) if mask else None
    if mask_image is not None and init is None:
        raise RequestError(422, "mask: a mask needs an init_image")
    return job_view(manager, manager.submit(body.model_dump(exclude={"init_image", "mask"}), init, mask_image))


def _read(upload: UploadFile, config) -> bytes:
    data = upload.file.read(config.max_upload + 1)
    if len(data) > config.max_upload:
        raise RequestError(413, f"{upload.filename or 'upload'}: exceeds the cap of {config.max_upload} bytes")
    return data


@router.get("/jobs", summary="List jobs, newest first")
def list_jobs(request: Request, offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
    manager = manager_of(request)
    jobs, total = manager.store.list(offset, limit)
    return {"jobs": [job_view(manager, j) for j in jobs], "total": total, "offset": offset, "limit": limit}


@router.get("/jobs/{job_id}", summary="One job")
def read_job(job_id: str, request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    return job_view(manager, get_job(manager, job_id))


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job")
def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    get_job(manager, job_id)
    return job_view(manager, manager.cancel(job_id))


@router.get("/jobs/{job_id}/images/{n}", summary="The n-th image of a job (PNG)", response_class=FileResponse)
def job_image(job_id: str, n: str, request: Request):
    manager = manager_of(request)
    job = get_job(manager, job_id)
    if not (n.isascii() and n.isdigit() and int(n) < len(job.images)):
        raise RequestError(404, f"job {job_id} has no image {n} (it has {len(job.images)})")
    path = manager.outputs / job.images[int(n)]  # names the server wrote, never taken from the request
    if not path.is_file():
        raise RequestError(404, f"image {n} of job {job_id} is missing from the outputs folder")
    return FileResponse(path, media_type="image/png")


@router.get("/jobs/{job_id}/events", summary="Progress as Server-Sent Events", response_class=StreamingResponse)
def job_events(job_id: str, request: Request):
    """Events: `progress` (status, step, total, eta, preview as a data: URL when a new one is ready)
    and a last `done` (the job as GET /api/jobs/{id} returns it)."""
    manager = manager_of(request)
    get_job(manager, job_id)
    return StreamingResponse(
        _events(manager, job_id), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _events(manager: JobManager, job_id: str, keepalive: float = 15.0, poll: float = 0.1):
    """An async generator (no thread is held while a client follows a job): one `progress` event
    per step (the step events are kept in memory, so none is missed), then `done`."""
    sent = 0
    queued_sent = False
    quiet_since = time.monotonic()
    while not manager.stopping:
        job = manager.store.get(job_id)
        progress = manager.progress.get(job_id) or manager.recent.get(job_id)
        events = progress.events[sent:] if progress is not None else []
        if not events and job.status == "queued" and not queued_sent:
            queued_sent = True
            events = [{"step": 0, "total": 0, "eta": None}]
            sent -= 1  # not a step event
        if events:
            for event in events:
                data = {"status": "queued" if not event["total"] else "running"}
                data |= {k: v for k, v in event.items() if k != "preview"}
                if event.get("preview") is not None:
                    data["preview"] = "data:image/png;base64," + base64.b64encode(event["preview"]).decode()
                yield _sse("progress", data)
            sent += len(events)
            quiet_since = time.monotonic()
            continue
        if job.status in FINISHED:
            yield _sse("done", job_view(manager, job))
            return
        if time.monotonic() - quiet_since >= keepalive:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(poll)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def png_info(data: bytes, config, field: str = "image") -> dict[str, Any]:
    """The parameters of a PNG: A1111's text, our JSON record, and GenerationParams fields read from them."""
    decode_image(data, field, config)  # the same caps and checks as any upload
    with Image.open(io.BytesIO(data)) as img:
        text = dict(getattr(img, "text", {}) or {})
    parameters, raw = text.get("parameters"), text.get("stablediff")
    record = None
    params = None
    if raw is not None:
        try:
            record = json.loads(raw)
            params, _ = GenerationParams.from_record(record, field)
        except ValueError as err:
            raise RequestError(422, f"{field}: the stablediff chunk is invalid ({err})") from None
    elif parameters is not None:
        try:
            params = GenerationParams.from_a1111(parameters)
        except (ValueError, KeyError) as err:
            raise RequestError(422, f"{field}: the parameters text cannot be read ({err})") from None
    values = None
    if params is not None:
        values = {k: v for k, v in params.to_json_dict().items() if not k.endswith("_given") and k != "format"}
        for name in ("init_image", "mask", "latents"):
            values.pop(name, None)
    return {"parameters": parameters, "stablediff": record, "params": values}


@router.post("/png-info", summary="The parameters stored in a PNG (ours or A1111's)")
def read_png_info(request: Request, image: Annotated[UploadFile, File()]) -> dict[str, Any]:
    manager = manager_of(request)
    return png_info(_read(image, manager.config), manager.config)


@router.get("/models", summary="The models this server can load, and the current one")
def models(request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    return {"current": manager.current.entry.name, "models": [e.to_dict() for e in manager.entries]}


@router.post("/models", summary="Switch the current model (the previous one stays on any error)")
def switch_model(body: ModelSwitch, request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    switch(manager, body.name, "name")
    return models(request)


@router.get("/options", summary="The samplers and schedules jobs may name, the field defaults, the model's size")
def options(request: Request) -> dict[str, Any]:
    """What a form needs: the native names (with A1111's labels), the JobRequest defaults and the
    current model's own image size (the default width and height)."""
    manager = manager_of(request)
    defaults = {k: f.default for k, f in JobRequest.model_fields.items() if k != "prompt" and f.default is not None}
    return {
        "samplers": [{"name": name, "label": label} for name, label in A1111_SAMPLERS.items()],  # every sampler
        "schedules": [{"name": name, "label": A1111_SCHEDULES.get(name, "Default")} for name in SCHEDULES],
        "defaults": defaults,
        "default_size": manager.current.pipe.spec.default_size,
    }


def switch(manager: JobManager, name: str, field: str) -> None:
    try:
        manager.switch_model(name)
    except ValueError as err:
        status = 404 if str(err).startswith("unknown model") else 422
        raise RequestError(status, f"{field}: {err}") from None
