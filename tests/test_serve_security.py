"""Security defaults of `stablediff serve`: loopback bind, API key, Host allow-list, size caps,
image URLs by id only, nothing written for a refused request; and one request over a real socket."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from stablediff.cli import main
from stablediff.serve import ServeConfig
from stablediff.serve.app import create_app
from stablediff.serve.security import host_name

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    out = tmp_path_factory.mktemp("keyed")
    app = create_app(ServeConfig(model="tiny", outputs=out, api_key=KEY, max_body=64 * 1024, max_upload=32 * 1024))
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        yield client, app.state.manager


def snapshot(manager) -> tuple[int, list[str]]:
    """Jobs in the store and the files of the outputs folder (the database files aside)."""
    files = sorted(str(p.relative_to(manager.outputs)) for p in manager.outputs.rglob("*") if "sqlite3" not in p.name)
    return manager.store.list(0, 1)[1], files


def png_claiming(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims width x height (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_non_loopback_bind_without_key_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["serve", "--host", "0.0.0.0", "--outputs", str(out), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "--api-key" in err and "loopback" in err
    assert not out.exists()  # refused before anything was created or loaded
    with pytest.raises(ValueError, match="api-key"):
        ServeConfig(host="192.168.1.5").check()
    ServeConfig(host="192.168.1.5", api_key=KEY).check()
    ServeConfig(host="::1").check()
    ServeConfig(host="localhost").check()


def test_api_key_required_on_every_route(keyed):
    client, manager = keyed
    before = snapshot(manager)
    body = {"prompt": "x", "steps": 2, "seed": 1}
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = client.post("/api/jobs", json=body, headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["detail"]
        assert client.post("/sdapi/v1/txt2img", json=body, headers=headers).status_code == 401
        assert client.get("/api/jobs", headers=headers).status_code == 401
        assert client.get("/openapi.json", headers=headers).status_code == 401
    assert snapshot(manager) == before  # nothing queued, nothing written
    ok = client.post("/api/jobs", json=body, headers={"X-API-Key": KEY})
    assert ok.status_code == 201
    assert manager.wait(ok.json()["id"], 60).status == "done"
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {KEY}"}).json()["total"] == before[0] + 1


def test_foreign_host_header_is_400(keyed):
    client, manager = keyed
    headers = {"X-API-Key": KEY}
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example", "localhost.attacker.net"):
        response = client.get("/api/models", headers={**headers, "Host": host})
        assert response.status_code == 400 and "Host" in response.json()["detail"]
    for host in ("localhost", "localhost:7860", "127.0.0.1:7860", "[::1]:7860", "[::1]"):
        assert client.get("/api/models", headers={**headers, "Host": host}).status_code == 200, host
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM:8080") == "example.com"


def test_no_cors_headers(keyed):
    client, _ = keyed
    response = client.get("/api/models", headers={"X-API-Key": KEY, "Origin": "http://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = client.options("/api/jobs", headers={"Origin": "http://evil.example", "X-API-Key": KEY})
    assert "access-control-allow-origin" not in preflight.headers


def test_image_urls_take_ids_only(keyed):
    client, manager = keyed
    headers = {"X-API-Key": KEY}
    job = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "seed": 2}, headers=headers).json()
    assert manager.wait(job["id"], 60).status == "done"
    assert client.get(f"/api/jobs/{job['id']}/images/0", headers=headers).status_code == 200
    for url in (
        f"/api/jobs/{job['id']}/images/..%2F..%2Fjobs.sqlite3",
        f"/api/jobs/{job['id']}/images/..%2fjobs.sqlite3",
        "/api/jobs/..%2F..%2Fetc%2Fpasswd/images/0",
        "/api/jobs/%2e%2e/images/0",
        f"/api/jobs/{job['id']}/images/0%2F..%2F..%2Fjobs.sqlite3",
        f"/api/jobs/{job['id']}/images/%2Fetc%2Fpasswd",
        f"/api/jobs/{job['id']}/images/1",
        f"/api/jobs/{job['id']}/images/00x",
    ):
        response = client.get(url, headers=headers)
        assert response.status_code == 404, url
        assert b"SQLite" not in response.content and b"root:" not in response.content


def test_oversized_body_is_413_and_nothing_written(keyed):
    client, manager = keyed
    before = snapshot(manager)
    big = {"prompt": "x" * (100 * 1024), "steps": 2}
    response = client.post("/api/jobs", json=big, headers={"X-API-Key": KEY})
    assert response.status_code == 413 and "cap" in response.json()["detail"]

    def chunks():  # no Content-Length: the cap holds while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'

    response = client.post(
        "/api/jobs", content=chunks(), headers={"X-API-Key": KEY, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert snapshot(manager) == before


def test_large_uploads_and_decompression_bombs_are_413(keyed):
    client, manager = keyed
    before = snapshot(manager)
    headers = {"X-API-Key": KEY}
    for claim in ((100_000, 100_000), (5000, 5000)):  # over PIL's own bomb limit; over the server's pixel cap
        bomb = base64.b64encode(png_claiming(*claim)).decode()
        response = client.post("/api/jobs", json={"prompt": "x", "init_image": bomb}, headers=headers)
        assert response.status_code == 413 and "pixels" in response.json()["detail"], response.text
        response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [bomb]}, headers=headers)
        assert response.status_code == 413
        files = {"image": ("b.png", png_claiming(*claim), "image/png")}
        assert client.post("/api/png-info", files=files, headers=headers).status_code == 413
    noise = Image.effect_noise((128, 128), 100).convert("RGB")  # ~48 KB as PNG: over the 32 KB upload cap
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 32 * 1024
    response = client.post(
        "/api/jobs/multipart",
        data={"params": json.dumps({"prompt": "x"})},
        files={"init_image": ("n.png", buffer.getvalue(), "image/png")},
        headers=headers,
    )
    assert response.status_code == 413 and "cap" in response.json()["detail"]
    assert snapshot(manager) == before


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_real_socket_round_trip(tmp_path):
    port = free_port()
    config = ServeConfig(model="tiny", outputs=tmp_path, port=port, api_key=KEY)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/models", timeout=10)
        assert refused.value.code == 401
        body = json.dumps({"prompt": "a star", "steps": 2, "seed": 3}).encode()
        request = urllib.request.Request(
            f"{url}/sdapi/v1/txt2img", data=body, headers={"X-API-Key": KEY, "Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            data = json.loads(response.read())
        assert json.loads(data["info"])["all_seeds"] == [3]
        assert Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).size == (64, 64)
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()
