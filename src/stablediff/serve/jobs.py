"""The job queue: submitting, running, cancelling and following generations.

One `Worker` thread per loaded model runs one job at a time from its queue. `JobManager` owns the
store, the current model's worker and the workers of models switched away from (each finishes
its queue, then exits and releases its model). Progress (step, total, ETA, a preview PNG every
few steps) lives in memory; waiters (SSE streams, A1111's synchronous calls) sleep on one
condition variable that every change notifies.

Cancel: a queued job is marked cancelled and skipped; a running one stops at its next step, when
the pipeline's progress callback raises `JobCancelled` (nothing in the pipeline changes).
Restart: jobs left queued or running in the store are queued again, with the params (and seed)
they were stored with, so they give the same images.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stablediff.loading import default_model
from stablediff.lora.tags import find_lora, parse_lora_tags
from stablediff.outputs import ImageWriter
from stablediff.params import GenerationParams
from stablediff.serve.config import ServeConfig
from stablediff.serve.models import ModelEntry, find_model, list_models, load_entry
from stablediff.serve.preview import fit_projection, preview_png
from stablediff.serve.security import RequestError
from stablediff.serve.store import FINISHED, Job, JobStore, new_job_id

log = logging.getLogger(__name__)

INPUTS = "inputs"  # subfolder of the outputs folder for uploaded init images and masks
SEED_RANGE = 2**32
RECENT = 32  # finished jobs whose step events stay in memory for late event streams


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running job."""


class _Stopping(Exception):
    """Raised from the progress callback when the server shuts down (the job stays unfinished)."""


@dataclass
class Progress:
    step: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    preview: bytes | None = None
    preview_step: int = 0
    # every step's {"step", "total", "eta"} (and "preview" PNG bytes on the latest preview's step
    # only), so that an event stream misses no step however late it polls
    events: list[dict[str, Any]] = field(default_factory=list)

    def eta(self) -> float | None:
        if self.step <= 0 or self.total <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.step * (self.total - self.step)

    def to_dict(self) -> dict[str, Any]:
        eta = self.eta()
        return {"step": self.step, "total": self.total, "eta": None if eta is None else round(eta, 3)}


class Worker:
    """One loaded model and the thread that loads it and runs its jobs, one at a time.

    Every torch call of the model happens on that one thread, loading and the preview fit
    included: a model loaded on one thread and run on another gave the process two OpenMP thread
    teams, and a job then took twice as long on two cores (benchmarks/serve_load.py)."""

    def __init__(self, manager: JobManager, entry: ModelEntry):
        self.manager = manager
        self.entry = entry
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.pending = 0  # jobs queued and not yet started
        self.running: str | None = None
        self.retired = False
        self._loaded = threading.Event()
        self._error: ValueError | None = None
        self.thread = threading.Thread(target=self._main, name=f"stablediff-worker-{entry.name}", daemon=True)
        self.thread.start()
        self._loaded.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            self.pipe, self.digest = load_entry(self.entry, self.manager.config.device)
            # a prompt's <lora:name:w> tags and embedding names are looked up in these folders
            self.pipe.lora_dir = self.manager.config.lora_dir
            self.pipe.embeddings_dir = self.manager.config.embeddings_dir
            self.writer = ImageWriter(self.pipe, self.digest)
            # the preview fit decodes with the model's VAE: a broken model can fail here too
            self.weight, self.bias = fit_projection(self.pipe)
        except Exception as err:
            self._error = (
                err if isinstance(err, ValueError) else ValueError(f"cannot load model {self.entry.name!r}: {err}")
            )
            return
        finally:
            self._loaded.set()
        self._loop()

    @property
    def model_name(self) -> str:
        return Path(self.pipe.source).stem if self.pipe.source else self.pipe.spec.name

    def put(self, job_id: str) -> None:
        with self.manager.changed:
            self.pending += 1
        self.queue.put(job_id)

    def retire(self) -> None:
        """Finish the queued jobs, then exit (a model switched away from)."""
        self.retired = True
        self.queue.put(None)

    def _loop(self) -> None:
        while True:
            job_id = self.queue.get()
            if job_id is None:
                if self.manager.stopping or (self.retired and self.queue.empty()):
                    return
                continue
            with self.manager.changed:
                self.pending -= 1
            if self.manager.stopping:
                return
            try:
                self._run(job_id)
            except Exception:  # never let one job kill the worker
                log.exception("job %s crashed the worker loop", job_id)
            if self.retired and self.queue.empty():
                return

    def _run(self, job_id: str) -> None:
        manager = self.manager
        store = manager.store
        if not store.mark_running(job_id):
            return  # cancelled while queued
        job = store.get(job_id)
        assert job is not None
        progress = Progress()
        with manager.changed:
            self.running = job_id
            manager.progress[job_id] = progress
            manager.changed.notify_all()
        status, error, names = "failed", None, []
        try:
            params = manager.params_of(job)
            latest: list[torch.Tensor] = []  # the newest x0 estimate of the first image

            def keep(denoised: torch.Tensor) -> None:
                latest[:] = [denoised[0]]

            def callback(step: int, total: int) -> None:
                if manager.stopping:
                    raise _Stopping
                if job_id in manager.cancel_requested:
                    raise JobCancelled
                with manager.changed:
                    progress.step, progress.total = step, total
                    event = progress.to_dict()
                    every = manager.config.preview_every
                    if latest and (step % every == 0 or step == total):
                        progress.preview = preview_png(latest[0], self.weight, self.bias)
                        progress.preview_step = step
                        for earlier in progress.events:
                            earlier.pop("preview", None)
                        event["preview"] = progress.preview
                    progress.events.append(event)
                    manager.changed.notify_all()

            images = self.pipe.generate(params, callback=callback, preview=keep)
            names = self._write(job, params, images)
            status = "done"
        except _Stopping:
            status = None
        except JobCancelled:
            status = "cancelled"
        except Exception as err:
            log.warning("job %s failed: %s", job_id, err)
            error = f"{type(err).__name__}: {err}"
        finally:
            if status is not None:
                store.finish(job_id, status, error, names)
            with manager.changed:
                self.running = None
                manager.recent[job_id] = manager.progress.pop(job_id)
                while len(manager.recent) > RECENT:
                    manager.recent.popitem(last=False)
                manager.cancel_requested.discard(job_id)
                manager.changed.notify_all()

    def _write(self, job: Job, params: GenerationParams, images: list[Image.Image]) -> list[str]:
        """Each image as ``<job id>-<k>.png`` with the command line's two PNG chunks; file names."""
        params = self.pipe.resolve_params(params)
        names = [f"{job.id}-{k}.png" for k in range(len(images))]
        for k, (image, name) in enumerate(zip(images, names, strict=True)):
            self.writer.write(image, params, k, self.manager.outputs / name, overwrite=True)
        return names


class JobManager:
    """The store, the workers and the in-memory progress of one server."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.outputs = Path(config.outputs)
        self.outputs.mkdir(parents=True, exist_ok=True)
        (self.outputs / INPUTS).mkdir(exist_ok=True)
        self.store = JobStore(self.outputs)
        self.changed = threading.Condition()
        self.progress: dict[str, Progress] = {}  # running jobs
        self.recent: OrderedDict[str, Progress] = OrderedDict()  # the last RECENT finished jobs
        self.cancel_requested: set[str] = set()
        self.a1111_options: dict[str, Any] = {}  # /sdapi/v1/options set by clients
        self.stopping = False
        self.startup = config.model or default_model()
        self.entries = list_models(config.models_dir, self.startup)
        self._switch_lock = threading.Lock()
        self.workers: list[Worker] = []
        entry = find_model(self.entries, self.startup)
        self.current = self._start_worker(entry)
        self._recover()

    # ---- models ---------------------------------------------------------------------------

    def _start_worker(self, entry: ModelEntry) -> Worker:
        worker = Worker(self, entry)  # ValueError naming the model if it cannot be loaded
        self.workers.append(worker)
        return worker

    def switch_model(self, name: str) -> Worker:
        """Load ``name`` and make it current; on any failure the current model stays (ValueError)."""
        with self._switch_lock:
            self.entries = list_models(self.config.models_dir, self.startup)
            entry = find_model(self.entries, name)
            if entry == self.current.entry:
                return self.current
            worker = self._start_worker(entry)
            old, self.current = self.current, worker
            old.retire()
            self.workers = [w for w in self.workers if w.thread.is_alive() or w is worker]
            return worker

    # ---- jobs -------------------------------------------------------------------------------

    def pending(self) -> int:
        return sum(w.pending for w in self.workers)

    def submit(
        self,
        values: dict[str, Any],
        init_image: Image.Image | None = None,
        mask: Image.Image | None = None,
    ) -> Job:
        """Validate and queue a job. ``values`` are GenerationParams fields (no images); a seed of
        None or -1 is drawn now and stored. RequestError (422/429) when refused: nothing written."""
        known = {f.name for f in fields(GenerationParams)} - {"init_image", "mask", "latents"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RequestError(422, f"unknown fields {unknown}; known: {sorted(known)}")
        if "prompt" not in values or not isinstance(values["prompt"], str):
            raise RequestError(422, "prompt: a string is required")
        worker = self.current
        try:  # a LoRA the prompt names must be there now, not fail the job later
            for tag in parse_lora_tags(values["prompt"])[1]:
                if tag.name not in worker.pipe.loras:
                    find_lora(tag.name, self.config.lora_dir)
        except ValueError as err:
            raise RequestError(422, f"prompt: {err}") from None
        values = dict(values)
        if values.get("seed") is None or values.get("seed") == -1:
            values["seed"] = secrets.randbelow(SEED_RANGE)
        try:
            params = GenerationParams(**values, init_image=init_image, mask=mask)
            params = worker.pipe.resolve_params(params).validate()
        except (ValueError, TypeError) as err:
            raise RequestError(422, str(err)) from None
        factor = worker.pipe.spec.vae.downscale
        if params.width % factor or params.height % factor:
            raise RequestError(422, f"width and height must be multiples of {factor} for this model")
        if worker.pipe.spec.is_inpaint and mask is None:
            raise RequestError(422, f"mask: {worker.entry.name} is an inpainting model and needs init_image and mask")
        if mask is not None and init_image is not None and mask.size != init_image.size:
            raise RequestError(
                422,
                f"mask: size {mask.width}x{mask.height} differs from the init image's "
                f"{init_image.width}x{init_image.height} (they must be equal)",
            )
        with self.changed:
            if self.pending() >= self.config.max_queue:
                raise RequestError(
                    429, f"the queue is full ({self.config.max_queue} jobs waiting); retry later", {"Retry-After": "5"}
                )
            job_id = new_job_id()
            record = replace(params, init_image=None, mask=None).to_json_dict()
            for name, image in (("init_image", init_image), ("mask", mask)):
                if image is not None:
                    record[name] = self._save_input(job_id, name, image)
                    record[f"{name}_given"] = True
            job = self.store.add(job_id, worker.entry.name, record)
            worker.put(job_id)
        return job

    def _save_input(self, job_id: str, name: str, image: Image.Image) -> str:
        """Write an uploaded image as ``inputs/<job id>-<name>.png`` (atomically); its relative path."""
        relative = f"{INPUTS}/{job_id}-{name}.png"
        path = self.outputs / relative
        temp = path.with_name(f".{path.name}.tmp")
        image.save(temp, format="PNG")
        os.replace(temp, path)
        return relative

    def params_of(self, job: Job) -> GenerationParams:
        """The GenerationParams a stored job runs with (input paths resolved in the outputs folder)."""
        data = dict(job.params)
        for name in ("init_image", "mask"):
            if data.get(name):
                relative = Path(data[name])
                if relative.is_absolute() or ".." in relative.parts:
                    raise ValueError(f"{name}: stored path {data[name]!r} is outside the outputs folder")
                data[name] = str(self.outputs / relative)
        return GenerationParams.from_json_dict(data)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job (KeyError if unknown). A finished job is returned unchanged."""
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.status == "queued" and self.store.cancel_queued(job_id):
            with self.changed:
                self.changed.notify_all()
        elif job.status in ("queued", "running"):  # running (or started meanwhile)
            with self.changed:
                self.cancel_requested.add(job_id)
                self.changed.notify_all()
        return self.store.get(job_id) or job

    def running_job(self) -> str | None:
        return next((w.running for w in self.workers if w.running), None)

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Block until the job is finished (or ``timeout`` seconds); the job as stored."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while True:
                job = self.store.get(job_id)
                if job is None or job.status in FINISHED:
                    return job
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return job
                self.changed.wait(0.5 if left is None else min(left, 0.5))

    def _recover(self) -> None:
        """Queue again the jobs a previous run left queued or running, on the model each was made for."""
        extra: list[Worker] = []
        for job in self.store.requeue_unfinished():
            worker = next((w for w in self.workers if w.entry.name == job.model), None)
            if worker is None:
                try:
                    worker = self._start_worker(find_model(self.entries, job.model))
                    extra.append(worker)
                except ValueError as err:
                    self.store.mark_running(job.id)
                    self.store.finish(job.id, "failed", f"cannot run after restart: {err}")
                    continue
            log.info("job %s queued again after a restart", job.id)
            worker.put(job.id)
        for worker in extra:
            worker.retire()  # it runs the recovered jobs, then releases its model

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers; a running job stops at its next step and stays unfinished (re-run at the next start)."""
        self.stopping = True
        for worker in self.workers:
            worker.queue.put(None)
        for worker in self.workers:
            worker.thread.join(timeout)
