"""docs/serve.md's picture: the web page of `stablediff serve` after a few generations.

    .venv/bin/python tools/screenshot_serve.py [--model shapes] [--out docs/images/serve.png]

Starts the server on the bundled model (or --model) with a temporary outputs folder, types each
prompt into the page in headless Chromium (Playwright driving Debian's chromium), generates, and
saves a screenshot of the page at desktop width. Nothing is edited by hand; rerun after changing
the page or the model.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import expect, sync_playwright

from stablediff.loading import default_model
from stablediff.serve import ServeConfig
from stablediff.serve.app import create_app

PROMPTS = [
    ("a small blue square at the top left", 2),
    ("a green triangle below a yellow star", 3),
    ("a large red circle in the center", 1),  # the last one stays in the form and the output
]
STEPS = 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--out", type=Path, default=Path("docs/images/serve.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=820)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory() as outputs:
        port = free_port()
        app = create_app(ServeConfig(model=args.model, outputs=Path(outputs), port=port))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            while not server.started:
                if not thread.is_alive():
                    return 1
                time.sleep(0.05)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_function("() => document.querySelectorAll('#sampler option').length > 0")
                for prompt, seed in PROMPTS:
                    page.fill("#prompt", prompt)
                    page.fill("#steps", str(STEPS))
                    page.fill("#seed", str(seed))
                    page.click("#generate")
                    expect(page.locator("#progress-text")).to_have_text(re.compile("^Done"), timeout=120_000)
                    print(f"{prompt!r}: {page.text_content('#progress-text')}")
                page.wait_for_function(
                    f"() => [...document.querySelectorAll('#gallery .thumb img')]"
                    f".filter((img) => img.naturalWidth > 0).length === {len(PROMPTS)}"
                )
                page.mouse.move(0, 0)  # no hover highlight in the picture
                args.out.parent.mkdir(parents=True, exist_ok=True)
                temp = args.out.with_name(f".{args.out.name}.tmp.png")
                page.screenshot(path=str(temp))
                os.replace(temp, args.out)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(30)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
