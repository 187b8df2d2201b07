"""Nothing is lost across a restart: jobs a killed server left queued or running run again with
their stored params (same seed, same image); finished jobs and their images stay listed."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from stablediff import GenerationParams, load_pipeline
from stablediff.serve import ServeConfig
from stablediff.serve.app import create_app
from stablediff.serve.store import JobStore, new_job_id


def record(params: GenerationParams) -> dict:
    return replace(params, init_image=None, mask=None).to_json_dict()


def test_jobs_left_running_or_queued_run_again_after_a_kill(tmp_path):
    first = GenerationParams("a red circle", steps=3, seed=123, width=64, height=64, sampler="euler")
    second = GenerationParams("a blue square", steps=2, seed=9, width=64, height=64)
    other = GenerationParams("a star", steps=2, seed=4, width=64, height=64)
    # What kill -9 leaves behind: one job marked running, one queued, one finished with its image,
    # one queued for a model that is no longer there.
    store = JobStore(tmp_path)
    running, queued, done, lost, on_other = (new_job_id() for _ in range(5))
    store.add(running, "tiny", record(first), status="running")
    store.add(queued, "tiny", record(second))
    store.add(done, "tiny", record(second))
    store.mark_running(done)
    Image.new("RGB", (64, 64), "red").save(tmp_path / f"{done}-0.png")
    store.finish(done, "done", images=[f"{done}-0.png"])
    store.add(lost, "gone.safetensors", record(second))
    store.add(on_other, "tiny-sd2", record(other))

    app = create_app(ServeConfig(model="tiny", outputs=tmp_path))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        manager = app.state.manager
        for job_id in (running, queued, on_other):
            assert manager.wait(job_id, 60).status == "done", manager.store.get(job_id).error
        failed = manager.store.get(lost)
        assert failed.status == "failed" and "gone.safetensors" in failed.error
        listed = client.get("/api/jobs", params={"limit": 100}).json()
        assert {j["id"] for j in listed["jobs"]} == {running, queued, done, lost, on_other}
        assert client.get(f"/api/jobs/{done}").json()["status"] == "done"
        assert client.get(f"/api/jobs/{done}/images/0").status_code == 200
        images = {
            job_id: np.asarray(Image.open(io.BytesIO(client.get(f"/api/jobs/{job_id}/images/0").content)))
            for job_id in (running, queued, on_other)
        }
    tiny = load_pipeline("tiny")
    np.testing.assert_array_equal(images[running], np.asarray(tiny.generate(first)[0]))
    np.testing.assert_array_equal(images[queued], np.asarray(tiny.generate(second)[0]))
    np.testing.assert_array_equal(images[on_other], np.asarray(load_pipeline("tiny-sd2").generate(other)[0]))


def test_random_seed_survives_a_restart(tmp_path):
    config = ServeConfig(model="tiny", outputs=tmp_path)
    app = create_app(config)
    manager = app.state.manager
    manager.shutdown()  # as if killed before the worker took the job: it stays queued
    job = manager.submit({"prompt": "a cat", "steps": 2, "seed": -1})
    seed = job.params["seed"]
    assert manager.store.get(job.id).status == "queued"

    app = create_app(config)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert app.state.manager.wait(job.id, 60).status == "done"
        png = client.get(f"/api/jobs/{job.id}/images/0").content
    direct = load_pipeline("tiny").generate(GenerationParams("a cat", steps=2, seed=seed))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(direct))


def test_real_kill_9_mid_job_loses_nothing(tmp_path):
    """A real server process killed with SIGKILL while sampling; the next server reruns the job."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "stablediff", "serve", "--model", "tiny", "--port", str(port)]
    process = subprocess.Popen([*command, "--outputs", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/models", timeout=5).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
                time.sleep(0.1)
        body = json.dumps({"prompt": "a blue square", "steps": 60, "seed": 77}).encode()
        request = urllib.request.Request(f"{url}/api/jobs", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            job_id = json.loads(response.read())["id"]
        while True:
            with urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=10) as response:
                job = json.loads(response.read())
            if job["progress"] and job["progress"]["step"] >= 1:
                break
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()
        process.stderr.close()
    assert JobStore(tmp_path).get(job_id).status == "running"  # as the killed server left it

    app = create_app(ServeConfig(model="tiny", outputs=tmp_path))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert app.state.manager.wait(job_id, 120).status == "done"
        png = client.get(f"/api/jobs/{job_id}/images/0").content
    direct = load_pipeline("tiny").generate(GenerationParams("a blue square", steps=60, seed=77))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(direct))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
