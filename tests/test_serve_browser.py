"""The web page of `stablediff serve` in a real headless Chromium (Playwright, Debian's chromium).

One uvicorn server on the tiny preset (64 x 64, a few steps: well under a second a job) and one
browser for the module. Without chromium or playwright the browser tests skip, unless CI=true,
where a missing browser fails them. The first tests need no browser: the page's files are served
without the key (with a strict CSP) while the API still needs it, and the native options list.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image, PngImagePlugin

from stablediff.diffusion import SAMPLERS
from stablediff.params import SCHEDULES
from stablediff.serve import ServeConfig
from stablediff.serve.app import create_app

KEY = "browser-test-key-123"
STATIC = Path(__file__).resolve().parents[1] / "src" / "stablediff" / "serve" / "static"
XSS = "<img src=x onerror=alert(1)><script>alert(2)</script>"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(outputs: Path, api_key: str | None = None, models: Path | None = None):
    """A real server on a free loopback port, in a thread: (base URL, its JobManager)."""
    port = free_port()
    app = create_app(ServeConfig(model="tiny", outputs=outputs, port=port, api_key=api_key, models_dir=models))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}", app.state.manager
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    (models / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")  # listed, fails to load
    with running_server(tmp_path_factory.mktemp("page"), models=models) as running:
        yield running


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("keyed"), api_key=KEY) as running:
        yield running


def http(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET, or of a JSON POST when ``body`` is given."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["X-API-Key"] = key
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def run_job(server, body: dict) -> dict:
    """A job made through the API (not the page), waited for: the job as GET /api/jobs/{id} gives it."""
    url, manager = server
    status, _, data = http(f"{url}/api/jobs", body)
    assert status == 201, data
    job_id = json.loads(data)["id"]
    assert manager.wait(job_id, 60).status == "done"
    return json.loads(http(f"{url}/api/jobs/{job_id}")[2])


def newest_job(server) -> dict:
    return json.loads(http(f"{server[0]}/api/jobs?offset=0&limit=1")[2])["jobs"][0]


def png(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    meta = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        meta.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


# ---- without a browser ---------------------------------------------------------------------------


def test_page_files_need_no_key_and_carry_a_strict_csp(keyed):
    url, _ = keyed
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        status, headers, body = http(url + path)
        assert status == 200 and headers["content-type"].startswith(kind), path
        assert headers["x-content-type-options"] == "nosniff"
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert b'src="/static/app.js"' in http(url + "/")[2]
    for path in ("/static/index.html", "/static/x.js", "/static/..%2Fapi.py", "/static/%2e%2e%2fapp.py"):
        assert http(url + path)[0] == 401 and http(url + path, key=KEY)[0] == 404, path  # only the table's names
    # everything else still needs the key: the API, the A1111 API, the schema, a POST to the page
    for path in ("/api/models", "/api/options", "/api/jobs", "/sdapi/v1/samplers", "/openapi.json", "/favicon.ico"):
        assert http(url + path)[0] == 401, path
        assert http(url + path, key=KEY)[0] in (200, 404), path
    assert http(url + "/", {"prompt": "x"})[0] == 401
    assert http(url + "/api/jobs", {"prompt": "x"})[0] == 401


def test_page_has_no_inline_script_and_never_parses_data_as_html():
    page = (STATIC / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", page) == ['<script type="module" src="/static/app.js">']
    assert not re.search(r"\son[a-z]+\s*=", page) and "style=" not in page and "javascript:" not in page
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_options_list_the_native_samplers_schedules_and_defaults(keyed):
    status, _, body = http(keyed[0] + "/api/options", key=KEY)
    options = json.loads(body)
    assert status == 200
    assert sorted(s["name"] for s in options["samplers"]) == sorted(SAMPLERS)
    assert {"name": "dpmpp_2m", "label": "DPM++ 2M"} in options["samplers"]
    assert [s["name"] for s in options["schedules"]] == list(SCHEDULES)
    assert {"name": "karras", "label": "Karras"} in options["schedules"]
    assert options["defaults"]["sampler"] == "dpmpp_2m" and options["defaults"]["steps"] == 20
    assert options["default_size"] == 64


# ---- in the browser ------------------------------------------------------------------------------


def missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        missing("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, width=1280, height=900): a fresh page (own localStorage); JS alerts are
    recorded in ``page.dialogs`` and must stay empty, uncaught exceptions fail the test."""
    contexts, pages = [], []

    def opener(url: str, width: int = 1280, height: int = 900):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.dialogs, page.errors = [], []
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda err: page.errors.append(str(err)))
        page.set_default_timeout(20_000)
        page.goto(url)
        pages.append(page)
        return page

    yield opener
    for page in pages:
        assert page.dialogs == [], f"a script ran: {page.dialogs}"
        assert page.errors == [], page.errors
    for context in contexts:
        context.close()


def ready(page) -> None:
    """Wait until the page has its choices from the server (the sampler list is filled)."""
    page.wait_for_function("() => document.querySelectorAll('#sampler option').length > 0")


def wait_done(page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done"), timeout=60_000)


def record_progress(page) -> None:
    """Record every value the progress bar takes (oldValue catches values set between two
    observer callbacks) and whether a preview image was shown."""
    page.evaluate(
        """() => {
        window.seenProgress = []; window.seenPreview = false;
        const bar = document.getElementById('progress');
        new MutationObserver((records) => {
            for (const r of records) window.seenProgress.push([r.oldValue, bar.max]);
            window.seenProgress.push([bar.getAttribute('value'), bar.max]);
        }).observe(bar, {attributes: true, attributeFilter: ['value'], attributeOldValue: true});
        new MutationObserver((records) => {
            for (const r of records) for (const n of r.addedNodes)
                if (n.classList && n.classList.contains('preview')) window.seenPreview = true;
        }).observe(document.getElementById('images'), {childList: true});
    }"""
    )


def save_screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    folder = os.environ.get("STABLEDIFF_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_generate_shows_progress_then_the_image_in_the_gallery(server, open_page, tmp_path):
    from playwright.sync_api import expect

    page = open_page(server[0])
    ready(page)
    record_progress(page)
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "8")
    page.fill("#seed", "5")
    page.select_option("#sampler", "euler")
    page.press("#prompt", "Control+Enter")
    wait_done(page)

    seen = page.evaluate("window.seenProgress")
    values = {float(v) for v, top in seen if v is not None and top == 8}
    assert any(0 < v < 8 for v in values), f"no intermediate progress shown: {seen}"
    assert 8.0 in values and page.evaluate("window.seenPreview")
    job = newest_job(server)
    assert job["status"] == "done" and job["params"]["prompt"] == "a red circle"
    assert (job["params"]["steps"], job["params"]["seed"], job["params"]["sampler"]) == (8, 5, "euler")
    # the result and the gallery show the image (fetched as a blob: URL), newest first
    result = page.locator("#images .result img")
    page.wait_for_function("() => document.querySelector('#images .result img').naturalWidth === 64")
    assert result.count() == 1
    expect(page.locator("#gallery .thumb").first).to_have_attribute("title", "a red circle")
    page.wait_for_function("() => document.querySelector('#gallery .thumb img').naturalWidth === 64")
    assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_disabled()
    save_screenshot(page, tmp_path, "serve-generated.png")


def test_use_these_parameters_and_img2img_from_the_gallery(server, open_page):
    body = {"prompt": "a blue square at the top left", "negative_prompt": "blur", "steps": 3, "seed": 4242}
    job = run_job(server, {**body, "sampler": "euler_a", "schedule": "karras", "guidance_scale": 5.5})
    page = open_page(server[0])
    ready(page)
    page.locator(f'#gallery .thumb[title="{body["prompt"]}"]').first.click()
    details = page.locator("#details")
    assert details.is_visible()
    text = page.locator("#details-text").text_content()
    assert text.startswith(body["prompt"] + "\nNegative prompt: blur\n") and "Seed: 4242" in text
    page.click("#use-params")
    assert not details.is_visible()
    form = {f: page.input_value(f"#{f}") for f in ("prompt", "negative_prompt", "steps", "seed", "sampler")}
    assert form == {**{k: str(v) for k, v in body.items()}, "sampler": "euler_a"}
    assert page.input_value("#schedule") == "karras" and float(page.input_value("#guidance_scale")) == 5.5

    page.locator(f'#gallery .thumb[title="{body["prompt"]}"]').first.click()
    page.click("#use-init")
    page.wait_for_function("() => document.getElementById('init-image').naturalWidth === 64")
    assert page.locator("#init-area").is_visible() and page.evaluate("document.getElementById('mask').width") == 64
    page.fill("#steps", "2")
    page.click("#generate")
    wait_done(page)
    img2img = newest_job(server)
    assert img2img["params"]["init_image"] and not img2img["params"].get("mask")
    stored = np.asarray(Image.open(server[1].outputs / img2img["params"]["init_image"]).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(http(server[0] + job["images"][0])[2])).convert("RGB"))
    np.testing.assert_array_equal(stored, original)  # the gallery image itself went up as the init image


def drop_file(page, data: bytes, name: str, target: str) -> None:
    """A drop of a file on ``target`` (a CSS selector), as a drag from the desktop makes it."""
    page.evaluate(
        """([b64, name, target]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        const element = document.querySelector(target);
        for (const type of ['dragenter', 'dragover', 'drop'])
            element.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
    }""",
        [base64.b64encode(data).decode(), name, target],
    )


def test_dropping_a_png_fills_the_form(server, open_page):
    from playwright.sync_api import expect

    job = run_job(server, {"prompt": "a green triangle", "steps": 2, "seed": 77, "sampler": "heun"})
    ours = http(server[0] + job["images"][0])[2]
    page = open_page(server[0])
    ready(page)
    message = page.locator("#message")

    drop_file(page, ours, "ours.png", "#gallery")
    expect(message).to_contain_text("Parameters read from ours.png")
    assert page.input_value("#prompt") == "a green triangle"
    assert (page.input_value("#seed"), page.input_value("#steps"), page.input_value("#sampler")) == ("77", "2", "heun")

    a1111 = "a house\nNegative prompt: blur\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, "
    a1111 += "Seed: 42, Size: 512x768"
    theirs = png(Image.new("RGB", (8, 8)), {"parameters": a1111})
    page.set_input_files("#png-file", files=[{"name": "theirs.png", "mimeType": "image/png", "buffer": theirs}])
    expect(message).to_contain_text("Parameters read from theirs.png")
    fields = ("prompt", "negative_prompt", "steps", "seed", "sampler", "schedule", "width", "height")
    values = [page.input_value(f"#{f}") for f in fields]
    assert values == ["a house", "blur", "12", "42", "dpmpp_2m", "karras", "512", "768"]
    assert float(page.input_value("#guidance_scale")) == 6

    drop_file(page, png(Image.new("RGB", (8, 8))), "plain.png", "main")
    expect(message).to_contain_text("no generation parameters")
    assert "error" in message.get_attribute("class") and page.input_value("#prompt") == "a house"

    drop_file(page, ours, "init.png", "#init-zone")  # a drop on the img2img box sets the init image
    page.wait_for_function("() => document.getElementById('init-image').naturalWidth === 64")
    assert page.locator("#init-area").is_visible()


def test_inpainting_sends_the_painted_mask_at_the_init_size(server, open_page):
    rng = np.random.default_rng(0)
    init = png(Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)))  # 96 x 64, not square
    page = open_page(server[0])
    ready(page)
    page.set_input_files("#init-file", files=[{"name": "room.png", "mimeType": "image/png", "buffer": init}])
    page.wait_for_function("() => document.getElementById('init-image').naturalWidth === 96")
    assert page.evaluate("[document.getElementById('mask').width, document.getElementById('mask').height]") == [96, 64]
    page.eval_on_selector("#strength", "(el) => { el.value = '0.6'; el.dispatchEvent(new Event('input')); }")
    assert page.text_content("#strength-value") == "0.6"

    box = page.locator("#mask").bounding_box()  # a stroke across the middle of the picture
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    for k in range(1, 6):
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.08 * k), box["y"] + box["height"] * 0.5)
    page.mouse.up()

    page.fill("#prompt", "a yellow star")
    page.fill("#steps", "3")
    page.click("#generate")
    wait_done(page)
    job = newest_job(server)
    params = job["params"]
    assert job["status"] == "done" and params["strength"] == 0.6
    assert params["init_image"] == f"inputs/{job['id']}-init_image.png"
    assert params["mask"] == f"inputs/{job['id']}-mask.png"
    outputs = server[1].outputs
    assert Image.open(outputs / params["init_image"]).size == (96, 64)
    mask = np.asarray(Image.open(outputs / params["mask"]).convert("L"))
    assert mask.shape == (64, 96)
    white, black = (mask > 200).mean(), (mask < 50).mean()
    assert 0.02 < white < 0.6 and black > 0.3, (white, black)  # painted across the middle only
    assert mask[32, 48] > 200 and mask[2, 2] < 50 and mask[32, 2] < 50

    page.click("#mask-clear")
    assert page.evaluate(
        "document.getElementById('mask').getContext('2d').getImageData(0, 0, 96, 64)"
        ".data.every((v, i) => i % 4 !== 3 || v === 0)"
    )


def test_a_hostile_prompt_is_shown_as_text(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server[0])
    ready(page)
    page.fill("#prompt", XSS)
    page.fill("#steps", "2")
    page.click("#generate")
    wait_done(page)
    thumb = page.locator("#gallery .thumb").first
    expect(thumb).to_have_attribute("title", XSS)  # the gallery reloads after the job
    thumb.click()
    expect(page.locator("#details-text")).to_contain_text(XSS)
    assert page.locator("#details-text").text_content().splitlines()[0] == XSS
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], script:not([src])').length") == 0
    page.keyboard.press("Escape")
    page.reload()  # the gallery of a fresh page shows it as text too
    ready(page)
    expect(page.locator("#gallery .thumb").first).to_have_attribute("title", XSS)
    # dialogs: checked empty by the fixture


def test_cancel_stops_a_running_job(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server[0])
    ready(page)
    page.fill("#prompt", "a long one")
    page.fill("#steps", "1000")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Step \d+/1000 · ETA"))
    page.click("#cancel")
    expect(page.locator("#progress-text")).to_have_text("Cancelled")
    job = newest_job(server)
    assert job["status"] == "cancelled" and job["images"] == [] and job["params"]["prompt"] == "a long one"
    assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_disabled()


def test_a_failed_model_switch_shows_why_and_keeps_the_model(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server[0])
    ready(page)
    assert page.input_value("#model") == "tiny"
    page.select_option("#model", "broken.safetensors")
    expect(page.locator("#message")).to_contain_text("cannot load model 'broken.safetensors'")
    assert "error" in page.get_attribute("#message", "class")
    expect(page.locator("#model")).to_have_value("tiny")
    assert page.locator("#model").is_enabled()
    assert json.loads(http(server[0] + "/api/models")[2])["current"] == "tiny"


def test_phone_width_has_one_column_and_no_horizontal_scroll(server, open_page):
    run_job(server, {"prompt": "a wide " + "and long " * 40 + "prompt", "steps": 2, "seed": 1})
    page = open_page(server[0], width=375, height=740)
    ready(page)
    page.wait_for_function("() => document.querySelector('#gallery .thumb img')?.naturalWidth > 0")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.locator("#generate").is_visible()
    form, output = page.locator("#form").bounding_box(), page.locator(".output").bounding_box()
    assert output["y"] >= form["y"] + form["height"]  # one column: the output below the form
    page.locator("#gallery .thumb").first.click()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.locator("#use-params").is_visible()


def test_with_an_api_key_the_page_asks_for_it(keyed, open_page):
    from playwright.sync_api import expect

    url, manager = keyed
    page = open_page(url)
    message = page.locator("#message")
    expect(message).to_contain_text("API key")  # the first calls were refused
    assert page.locator("#key-field").is_visible()
    page.fill("#prompt", "a purple ring")
    page.fill("#steps", "2")
    page.click("#generate")
    expect(message).to_contain_text("401")
    assert manager.store.list(0, 1)[1] == 0  # nothing queued

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    ready(page)
    assert not message.is_visible()
    page.click("#generate")
    wait_done(page)
    page.wait_for_function("() => document.querySelector('#gallery .thumb img')?.naturalWidth === 64")
    assert manager.store.list(0, 1)[1] == 1
    page.reload()  # the key is kept in localStorage
    ready(page)
    assert page.input_value("#api-key") == KEY and not message.is_visible()
