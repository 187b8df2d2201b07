"""The AUTOMATIC1111-compatible subset: request fields, response keys and types, as A1111 answers."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from stablediff import GenerationParams, load_pipeline
from stablediff.params import A1111_SCHEDULES
from stablediff.serve import ServeConfig
from stablediff.serve.app import create_app


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = create_app(ServeConfig(model="tiny", outputs=tmp_path_factory.mktemp("a1111")))
    with TestClient(app, base_url="http://localhost:7860") as client:
        yield client, app.state.manager


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def test_txt2img_shape_seeds_and_pixels(server, pipe):
    client, _ = server
    body = {
        "prompt": "a red circle",
        "negative_prompt": "blur",
        "steps": 3,
        "cfg_scale": 6.5,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler a",
        "scheduler": "Karras",
        "seed": 21,
        "batch_size": 1,
        "n_iter": 2,
        "enable_hr": False,
        "restore_faces": False,
        "send_images": True,
    }
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"images", "parameters", "info"}
    assert isinstance(data["images"], list) and all(isinstance(i, str) for i in data["images"])
    assert isinstance(data["parameters"], dict) and data["parameters"]["prompt"] == "a red circle"
    info = json.loads(data["info"])
    assert info["all_seeds"] == [21, 22] and info["seed"] == 21 and info["sampler_name"] == "Euler a"
    assert len(info["infotexts"]) == 2 and "Seed: 22" in info["infotexts"][1] and info["warnings"] == []
    for key, kind in (("prompt", str), ("all_prompts", list), ("cfg_scale", float), ("steps", int), ("width", int)):
        assert isinstance(info[key], kind), key
    params = GenerationParams(
        "a red circle", negative_prompt="blur", steps=3, guidance_scale=6.5, sampler="euler_a", schedule="karras",
        seed=21, batch_size=2, width=64, height=64,
    )  # fmt: off
    direct = pipe.generate(params)
    for k in range(2):
        np.testing.assert_array_equal(decode(data["images"][k]), np.asarray(direct[k]))


def test_txt2img_old_sampler_names_random_seed_and_defaults(server):
    client, _ = server
    data = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "sampler_name": "DPM++ 2M Karras"}).json()
    info = json.loads(data["info"])
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert 0 <= info["seed"] < 2**32 and info["cfg_scale"] == 7.0 and (info["width"], info["height"]) == (64, 64)
    assert data["parameters"]["seed"] == -1


def test_unsupported_fields_are_reported_not_ignored(server):
    client, manager = server
    data = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "x", "steps": 2, "seed": 1, "tiling": True, "override_settings": {"sd_vae": "other.pt"}},
    ).json()
    warnings = json.loads(data["info"])["warnings"]
    assert any("tiling" in w for w in warnings) and any("sd_vae" in w for w in warnings)
    before = manager.store.list(0, 1)[1]
    typo = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "stpes": 20})
    assert typo.status_code == 422 and "stpes" in typo.json()["detail"]
    bad = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nonsense"})
    assert bad.status_code == 422 and "sampler_name" in bad.json()["detail"] and "Euler a" in bad.json()["detail"]
    bad = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 100})
    assert bad.status_code == 422 and "width" in bad.json()["detail"]
    assert manager.store.list(0, 1)[1] == before


def test_img2img_with_mask_matches_generate(server, pipe):
    client, _ = server
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    body = {"prompt": "a blue square", "steps": 4, "seed": 5, "denoising_strength": 0.5, "width": 64, "height": 64}
    body |= {"sampler_name": "Euler", "scheduler": "karras"}
    data = client.post("/sdapi/v1/img2img", json={**body, "init_images": [b64png(init)], "mask": b64png(mask)}).json()
    assert data["parameters"]["init_images"] is None and data["parameters"]["mask"] is None
    assert json.loads(data["info"])["denoising_strength"] == 0.5
    direct = pipe.generate(
        GenerationParams(
            "a blue square",
            steps=4,
            seed=5,
            strength=0.5,
            init_image=init,
            mask=mask,
            width=64,
            height=64,
            guidance_scale=7.0,
            sampler="euler",
            schedule="karras",
        )
    )[0]
    np.testing.assert_array_equal(decode(data["images"][0]), np.asarray(direct))
    assert client.post("/sdapi/v1/img2img", json=body).status_code == 422  # no init_images
    bad = client.post("/sdapi/v1/img2img", json={**body, "init_images": ["!!!"]})
    assert bad.status_code == 422 and "init_images[0]" in bad.json()["detail"]


def test_lists_options_and_model_switch(server):
    client, manager = server
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "DPM++ 2M", "aliases": ["dpmpp_2m"], "options": {}} in samplers
    schedulers = client.get("/sdapi/v1/schedulers").json()
    names = {s["name"] for s in schedulers}
    assert names == {"automatic", *A1111_SCHEDULES} - {"default"} and "karras" in names
    assert {s["label"] for s in schedulers} == {"Automatic", *A1111_SCHEDULES.values()} - {"default"}
    models = client.get("/sdapi/v1/sd-models").json()
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "tiny"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 404
    assert client.post("/sdapi/v1/options", json={"show_progressbar": True}).status_code == 422
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd2"}).json() == {}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd2"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    assert manager.current.entry.name == "tiny"


def test_progress_and_interrupt(server):
    client, manager = server
    idle = client.get("/sdapi/v1/progress").json()
    assert set(idle) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert idle["progress"] == 0 and idle["current_image"] is None
    worker = manager.current
    real = worker.pipe.generate
    reached, release = threading.Event(), threading.Event()

    def generate(params, callback=None, **kwargs):
        def held(step, total):
            callback(step, total)
            if step >= 2:
                reached.set()
                release.wait(30)

        return real(params, callback=held, **kwargs)

    worker.pipe.generate = generate
    result = {}
    try:
        thread = threading.Thread(
            target=lambda: result.update(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 6}).json())
        )
        thread.start()
        assert reached.wait(30)
        progress = client.get("/sdapi/v1/progress").json()
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_step"] == 2
        assert progress["state"]["sampling_steps"] == 6 and isinstance(progress["eta_relative"], float)
        Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).verify()
        assert client.post("/sdapi/v1/interrupt").json() == {}
        release.set()
        thread.join(30)
    finally:
        release.set()
        worker.pipe.generate = real
    assert result["images"] == [] and json.loads(result["info"])["status"] == "cancelled"


def test_png_info(server):
    client, _ = server
    data = client.post("/sdapi/v1/txt2img", json={"prompt": "a star", "steps": 2, "seed": 4}).json()
    info = client.post("/sdapi/v1/png-info", json={"image": data["images"][0]}).json()
    assert set(info) == {"info", "items", "parameters"}
    assert info["info"].startswith("a star") and info["parameters"]["Seed"] == "4"
    assert info["parameters"]["Size-1"] == "64"
    assert client.post("/sdapi/v1/png-info", json={"image": "@@"}).status_code == 422


def test_lora_tags_and_embeddings_through_the_a1111_api(tmp_path, pipe):
    """A client's <lora:name:w> tag and embedding name work as in A1111: looked up in the server's
    folders, listed by /loras and /embeddings, named in the infotext with their hashes."""
    from safetensors.torch import save_file
    from test_addons_cli import generate, write_lora

    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    write_lora(loras, pipe)
    embeddings.mkdir()
    width = pipe.text_encoder.embeddings.token_embedding.embedding_dim
    save_file(
        {"emb_params": torch.randn(1, width, generator=torch.Generator().manual_seed(5))},
        str(embeddings / "glowstyle.safetensors"),
    )
    config = ServeConfig(model="tiny", outputs=tmp_path / "out", lora_dir=loras, embeddings_dir=embeddings)
    with TestClient(create_app(config), base_url="http://localhost:7860") as client:
        assert [entry["name"] for entry in client.get("/sdapi/v1/loras").json()] == ["detail"]
        assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {"glowstyle": {}}}
        body = {"prompt": "a glowstyle circle <lora:detail:0.7>, ", "steps": 2, "seed": 1, "sampler_name": "DPM++ 2M"}
        body |= {"scheduler": "Automatic", "cfg_scale": 7.5, "width": 64, "height": 64}
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        infotext = json.loads(answer.json()["info"])["infotexts"][0]
        assert 'Lora hashes: "detail: ' in infotext and 'TI hashes: "glowstyle: ' in infotext
        assert client.get("/sdapi/v1/embeddings").json()["loaded"]["glowstyle"]["vectors"] == 1
        missing = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a <lora:nope:1>"})
        assert missing.status_code == 422 and "no LoRA named 'nope'" in missing.text
    pipe.load_lora(loras / "detail.safetensors", 0.7)
    pipe.load_embedding(embeddings / "glowstyle.safetensors")
    try:
        expected = generate(pipe, "a glowstyle circle , ", schedule="karras")
    finally:
        pipe.unload_lora()
        pipe.unload_embedding()
    assert np.array_equal(decode(answer.json()["images"][0]), expected)
