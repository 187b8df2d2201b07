"""The native JSON API of `stablediff serve` (FastAPI's test client, the tiny preset, 2-4 steps)."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient  # the serve extra, installed by `make setup`
from PIL import Image

from stablediff import GenerationParams, load_pipeline
from stablediff.serve import ServeConfig
from stablediff.serve.app import create_app

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    app = create_app(ServeConfig(model="tiny", outputs=out, max_queue=3))
    with TestClient(app, base_url=BASE) as client:
        yield client, app.state.manager


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run_job(client, manager, body: dict) -> dict:
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 201, response.text
    job = manager.wait(response.json()["id"], 60)
    assert job.status == "done", job.error
    return client.get(f"/api/jobs/{job.id}").json()


def init_and_mask() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return init, Image.fromarray(mask)


def test_txt2img_bit_identical_to_generate(server, pipe):
    client, manager = server
    job = run_job(client, manager, {"prompt": "a red circle", "steps": 3, "seed": 7, "batch_size": 2})
    assert job["status"] == "done" and len(job["images"]) == 2
    direct = pipe.generate(GenerationParams("a red circle", steps=3, seed=7, batch_size=2))
    for k, url in enumerate(job["images"]):
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(pixels(response.content), np.asarray(direct[k]))
        meta = Image.open(io.BytesIO(response.content)).text
        assert f"Seed: {7 + k}" in meta["parameters"]
        assert json.loads(meta["stablediff"])["params"]["seed"] == 7 + k


def test_img2img_and_inpaint_base64_and_multipart_match_generate(server, pipe):
    client, manager = server
    init, mask = init_and_mask()
    common = {"prompt": "a blue square", "steps": 4, "seed": 3, "strength": 0.5}
    img2img = run_job(client, manager, {**common, "init_image": b64(init)})
    direct = pipe.generate(GenerationParams(**common, init_image=init))[0]
    np.testing.assert_array_equal(pixels(client.get(img2img["images"][0]).content), np.asarray(direct))
    assert img2img["params"]["init_image"] == f"inputs/{img2img['id']}-init_image.png"

    response = client.post(
        "/api/jobs/multipart",
        data={"params": json.dumps(common)},
        files={"init_image": ("i.png", png_bytes(init), "image/png"), "mask": ("m.png", png_bytes(mask), "image/png")},
    )
    assert response.status_code == 201, response.text
    job = manager.wait(response.json()["id"], 60)
    assert job.status == "done", job.error
    direct = pipe.generate(GenerationParams(**common, init_image=init, mask=mask))[0]
    np.testing.assert_array_equal(pixels(client.get(f"/api/jobs/{job.id}/images/0").content), np.asarray(direct))


def test_random_seed_is_drawn_once_and_stored(server):
    client, manager = server
    job = run_job(client, manager, {"prompt": "a star", "steps": 2, "seed": -1})
    seed = job["params"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    text = Image.open(io.BytesIO(client.get(job["images"][0]).content)).text["parameters"]
    assert f"Seed: {seed}," in text


def test_list_jobs_paged_newest_first(server):
    client, manager = server
    ids = [run_job(client, manager, {"prompt": f"p{i}", "steps": 2, "seed": i})["id"] for i in range(3)]
    page = client.get("/api/jobs", params={"offset": 0, "limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["total"] >= 3
    page2 = client.get("/api/jobs", params={"offset": 1, "limit": 2}).json()
    assert page2["jobs"][0]["id"] == ids[1]
    assert client.get("/api/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/api/jobs", params={"limit": 1000}).status_code == 422


def test_events_stream_progress_preview_and_done(server):
    client, manager = server
    job_id = client.post("/api/jobs", json={"prompt": "a cat", "steps": 4, "seed": 1}).json()["id"]
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    assert events[-1][0] == "done" and events[-1][1]["status"] == "done"
    steps = [data["step"] for name, data in events if name == "progress" and data["status"] == "running"]
    assert steps == [1, 2, 3, 4]  # every step, however late the stream polls
    final = next(data for name, data in events if name == "progress" and data["step"] == 4)
    assert final["total"] == 4 and final["eta"] == 0.0
    previews = [data["preview"] for name, data in events if "preview" in data]
    assert previews, "a preview every few steps"
    image = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1])))
    assert image.format == "PNG" and min(image.size) >= 64
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:  # a late stream replays the steps
        late = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert [d["step"] for d in late[:-1]] == [1, 2, 3, 4] and late[-1]["status"] == "done"


def test_preview_projection_is_fitted_to_the_vae(server, pipe):
    import torch

    from stablediff.serve.preview import fit_projection, project

    weight, bias = fit_projection(pipe)
    assert weight.shape == (3, pipe.spec.vae.z_channels) and bias.shape == (3,)
    z = torch.randn(1, pipe.spec.vae.z_channels, 8, 8, generator=torch.Generator().manual_seed(9))
    decoded = torch.nn.functional.avg_pool2d(pipe.decode(z), pipe.spec.vae.downscale)[0]
    approx = torch.einsum("kc,chw->khw", weight, z[0]) + bias[:, None, None]
    fitted_error = (approx - decoded).pow(2).mean()
    assert fitted_error < (decoded - decoded.mean()).pow(2).mean()  # better than a flat colour
    assert project(z[0], weight, bias).size == (8, 8)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])  # (DDIM ends at alphas_cumprod[0], not sigma 0)
def test_preview_follows_the_x0_estimate_to_the_final_latents(pipe, sampler):
    """The preview sees the denoiser's x0 estimate each step, not the noisy U-Net input: its last
    estimate is the final latent (for samplers that end at sigma = 0), the first one is not yet."""
    params = GenerationParams("a red circle", steps=4, seed=3, sampler=sampler)
    seen = []
    latents = pipe.sample_latents(params, preview=lambda x0: seen.append(x0.clone()))
    assert len(seen) == 4
    gap = (seen[-1] - latents).abs().max().item()
    print(f"{sampler}: last x0 estimate vs final latents, max |diff| = {gap:.2e}")
    assert gap < 1e-4
    assert (seen[0] - latents).abs().max() > 10 * gap  # the first estimate is still far


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "sampler": "nope"}, "sampler"),
        ({"prompt": "x", "width": 60}, "width"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 100000}, "steps"),
        ({"prompt": "x", "schedule": "linear"}, "schedule"),
        ({"prompt": "x", "strength": 2.0}, "strength"),
        ({"prompt": "x", "init_image": "%%%not base64"}, "init_image"),
        ({"prompt": "x", "init_image": base64.b64encode(b"just text, not an image").decode()}, "init_image"),
        ({"prompt": "x", "mask": "AAAA"}, "mask"),
        ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
        ({"steps": 3}, "prompt"),
    ],
)
def test_bad_requests_are_4xx_naming_the_field_and_queue_nothing(server, body, field):
    client, manager = server
    before = manager.store.list(0, 1)[1]
    files_before = sorted(p.name for p in manager.outputs.rglob("*") if "sqlite3" not in p.name)
    response = client.post("/api/jobs", json=body)
    assert response.status_code in (400, 422), response.text
    assert field in json.dumps(response.json())
    assert manager.store.list(0, 1)[1] == before
    assert sorted(p.name for p in manager.outputs.rglob("*") if "sqlite3" not in p.name) == files_before


def test_mask_of_another_size_is_refused(server):
    client, manager = server
    init, _ = init_and_mask()
    before = manager.store.list(0, 1)[1]
    inputs = sorted((manager.outputs / "inputs").iterdir())
    small = Image.new("L", (32, 32), 255)
    response = client.post("/api/jobs", json={"prompt": "x", "init_image": b64(init), "mask": b64(small)})
    assert response.status_code == 422 and "mask" in response.json()["detail"] and "32x32" in response.json()["detail"]
    assert manager.store.list(0, 1)[1] == before
    assert sorted((manager.outputs / "inputs").iterdir()) == inputs


def test_unknown_job_and_image_404(server):
    client, manager = server
    assert client.get("/api/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert client.get("/api/jobs/not-a-job").status_code == 404
    assert client.post("/api/jobs/0123456789abcdef0123456789abcdef/cancel").status_code == 404
    job = run_job(client, manager, {"prompt": "x", "steps": 2, "seed": 0})
    assert client.get(f"/api/jobs/{job['id']}/images/1").status_code == 404
    assert client.get(f"/api/jobs/{job['id']}/images/-1").status_code == 404


def test_png_info_ours_and_a1111(server):
    client, manager = server
    job = run_job(client, manager, {"prompt": "a green triangle", "steps": 2, "seed": 11, "sampler": "euler"})
    ours = client.get(job["images"][0]).content
    info = client.post("/api/png-info", files={"image": ("a.png", ours, "image/png")}).json()
    assert info["params"]["prompt"] == "a green triangle" and info["params"]["seed"] == 11
    assert info["params"]["sampler"] == "euler" and "Steps: 2" in info["parameters"]
    theirs = Image.new("RGB", (8, 8))
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text(
        "parameters",
        "a house\nNegative prompt: blur\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 6, Seed: 42, Size: 512x768",
    )
    buffer = io.BytesIO()
    theirs.save(buffer, format="PNG", pnginfo=meta)
    info = client.post("/api/png-info", files={"image": ("b.png", buffer.getvalue(), "image/png")}).json()
    assert info["stablediff"] is None
    assert info["params"]["prompt"] == "a house" and info["params"]["negative_prompt"] == "blur"
    assert (info["params"]["steps"], info["params"]["seed"], info["params"]["schedule"]) == (12, 42, "karras")
    assert (info["params"]["width"], info["params"]["height"]) == (512, 768)
    bad = client.post("/api/png-info", files={"image": ("c.png", b"not a png", "image/png")})
    assert bad.status_code == 422 and "image" in bad.json()["detail"]


def test_models_list_and_switch_errors_keep_the_current_model(server, tmp_path):
    client, manager = server
    models = client.get("/api/models").json()
    assert models["current"] == "tiny" and {"shapes", "tiny"} <= {m["name"] for m in models["models"]}
    missing = client.post("/api/models", json={"name": "no-such-model.safetensors"})
    assert missing.status_code == 404 and "no-such-model" in missing.json()["detail"]
    assert client.post("/api/models", json={"name": "/etc/passwd"}).status_code == 404
    assert client.get("/api/models").json()["current"] == "tiny"


def gate(manager):
    """Hold the worker inside its first step until released: (started, release)."""
    worker = manager.current
    real = worker.pipe.generate
    started, release = threading.Event(), threading.Event()

    def generate(params, callback=None, **kwargs):
        def held(step, total):
            started.set()
            release.wait(30)
            callback(step, total)

        return real(params, callback=held, **kwargs)

    worker.pipe.generate = generate
    return started, release, lambda: setattr(worker.pipe, "generate", real)


def test_cancel_queued_and_running_jobs(server):
    client, manager = server
    started, release, restore = gate(manager)
    try:
        running = client.post("/api/jobs", json={"prompt": "a", "steps": 4, "seed": 1}).json()["id"]
        assert started.wait(30)
        queued = client.post("/api/jobs", json={"prompt": "b", "steps": 4, "seed": 2}).json()["id"]
        assert client.post(f"/api/jobs/{queued}/cancel").json()["status"] == "cancelled"
        assert client.post(f"/api/jobs/{running}/cancel").json()["status"] == "running"  # stops at the next step
        release.set()
        assert manager.wait(running, 30).status == "cancelled"
        assert manager.wait(queued, 30).status == "cancelled"
        assert manager.store.get(running).images == [] and manager.store.get(queued).started is None
    finally:
        release.set()
        restore()
    assert run_job(client, manager, {"prompt": "c", "steps": 2, "seed": 3})["status"] == "done"  # worker still alive


def test_full_queue_is_429_with_retry_after(server):
    client, manager = server
    started, release, restore = gate(manager)
    try:
        ids = [client.post("/api/jobs", json={"prompt": "a", "steps": 2, "seed": 1}).json()["id"]]
        assert started.wait(30)
        for _ in range(manager.config.max_queue):
            response = client.post("/api/jobs", json={"prompt": "q", "steps": 2, "seed": 1})
            assert response.status_code == 201
            ids.append(response.json()["id"])
        total = manager.store.list(0, 1)[1]
        full = client.post("/api/jobs", json={"prompt": "one too many", "steps": 2, "seed": 1})
        assert full.status_code == 429 and int(full.headers["retry-after"]) > 0 and "full" in full.json()["detail"]
        assert manager.store.list(0, 1)[1] == total
    finally:
        release.set()
        restore()
    assert all(manager.wait(i, 60).status == "done" for i in ids)
