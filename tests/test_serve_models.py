"""Model switching in `stablediff serve`: models found in --models DIR, a broken or missing file is
a clear 4xx and the previous model stays loaded, jobs run on the model they were queued for."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stablediff import GenerationParams, load_pipeline, save
from stablediff.serve import ServeConfig
from stablediff.serve.app import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    save(load_pipeline("tiny-sd2", seed=3), models / "mine.safetensors")
    (models / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (models / "notes.txt").write_text("not a model")
    app = create_app(ServeConfig(model="tiny", models_dir=models, outputs=tmp_path_factory.mktemp("out")))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, app.state.manager, models


def test_models_dir_is_listed(server):
    client, _, _ = server
    listed = {m["name"]: m["kind"] for m in client.get("/api/models").json()["models"]}
    assert listed["mine.safetensors"] == "file" and listed["broken.safetensors"] == "file"
    assert "notes.txt" not in listed and listed["tiny"] == "preset" and listed["shapes"] == "bundled"
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert "mine.safetensors" in titles


def test_broken_model_is_422_and_the_previous_model_stays(server):
    client, manager, _ = server
    response = client.post("/api/models", json={"name": "broken.safetensors"})
    assert response.status_code == 422 and "broken.safetensors" in response.json()["detail"]
    response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors"})
    assert response.status_code == 422
    assert client.get("/api/models").json()["current"] == "tiny"
    job = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "seed": 1}).json()
    assert manager.wait(job["id"], 60).status == "done"


def test_switch_runs_on_the_new_model_and_png_names_it(server):
    client, manager, models = server
    assert client.post("/api/models", json={"name": "mine.safetensors"}).json()["current"] == "mine.safetensors"
    job = client.post("/api/jobs", json={"prompt": "a star", "steps": 2, "seed": 5}).json()
    assert job["model"] == "mine.safetensors" and manager.wait(job["id"], 60).status == "done"
    png = client.get(f"/api/jobs/{job['id']}/images/0").content
    direct = load_pipeline(models / "mine.safetensors").generate(GenerationParams("a star", steps=2, seed=5))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(direct))
    record = json.loads(Image.open(io.BytesIO(png)).text["stablediff"])
    assert record["model_file"] == "mine.safetensors" and record["model"] == "mine"
    assert client.post("/api/models", json={"name": "tiny"}).json()["current"] == "tiny"


def test_default_model_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEDIFF_MODEL", "tiny-sd2")
    app = create_app(ServeConfig(outputs=tmp_path))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/api/models").json()["current"] == "tiny-sd2"
