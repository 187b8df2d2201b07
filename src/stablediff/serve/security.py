"""Request checks before any route runs, and the decoding of uploaded images under caps.

`SecurityMiddleware` (plain ASGI) refuses, in this order: a Host header outside the allow-list
(400: defeats DNS rebinding), a missing or wrong API key when one is set (401, constant-time
compare; GET and HEAD of the web page's own files, ``public_paths``, need no key), a body over the
cap (413, from Content-Length or while reading). No CORS headers are ever sent, so browsers keep
other sites' pages from reading the answers.

`decode_image` turns uploaded bytes (raw or base64) into a PIL image, refusing oversized files and
images whose header claims too many pixels (413) before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json

from PIL import Image

from stablediff.image import load_image, load_mask
from stablediff.serve.config import ServeConfig

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class RequestError(Exception):
    """A refused request: HTTP ``status`` and a message naming the field and what is allowed."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def host_name(header: str) -> str:
    """The name part of a Host header: "a:80" -> "a", "[::1]:80" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def presented_key(headers: dict[str, str]) -> str | None:
    """The API key a request carries: ``X-API-Key`` or ``Authorization: Bearer``."""
    if "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def key_matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


class SecurityMiddleware:
    """Host allow-list, API key and body cap for every HTTP request (see the module text)."""

    def __init__(self, app, config: ServeConfig, public_paths: frozenset[str] = frozenset()):
        self.app = app
        self.allowed = config.allowed_hosts()
        self.api_key = config.api_key
        self.max_body = config.max_body
        self.public_paths = public_paths  # exact paths readable without the key (the page, no data)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is None or host_name(host) not in self.allowed:
            return await _refuse(send, 400, f"Host {host!r} is not allowed; allowed: {sorted(self.allowed)}")
        public = scope["method"] in ("GET", "HEAD") and scope["path"] in self.public_paths
        if self.api_key is not None and not public and not key_matches(presented_key(headers), self.api_key):
            return await _refuse(
                send, 401, "missing or wrong API key (send 'X-API-Key: KEY' or 'Authorization: Bearer KEY')"
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _refuse(send, 400, "Content-Length must be a number")
            if int(length) > self.max_body:
                return await _refuse(send, 413, f"request body of {length} bytes exceeds the cap of {self.max_body}")
        # The body is read here, under the cap, before any route sees it (a route's parser would
        # turn an error raised while reading into a 400); then replayed to the app.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await _refuse(send, 413, f"request body exceeds the cap of {self.max_body} bytes")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def decode_base64(text: str, field: str) -> bytes:
    """Bytes of a base64 string, with or without a ``data:image/...;base64,`` prefix (422 if malformed)."""
    if not isinstance(text, str) or not text:
        raise RequestError(422, f"{field}: expected a base64-encoded image string")
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{field}: malformed base64 (expected a base64-encoded PNG or JPEG)") from None


def decode_image(data: bytes, field: str, config: ServeConfig, *, mask: bool = False) -> Image.Image:
    """An uploaded image, fully decoded as RGB (or "L" for a mask) as the pipeline would read it.

    413 for more than ``config.max_upload`` bytes or a header claiming more than
    ``config.max_pixels`` pixels (checked before decoding, so a decompression bomb never expands);
    422 for anything that is not a PNG/JPEG/WebP/BMP/GIF image.
    """
    if len(data) > config.max_upload:
        raise RequestError(413, f"{field}: image of {len(data)} bytes exceeds the cap of {config.max_upload}")
    if not data:
        raise RequestError(422, f"{field}: empty upload (expected a PNG or JPEG image)")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise RequestError(413, f"{field}: image has too many pixels (cap {config.max_pixels})") from None
    except Exception:  # PIL raises many kinds for non-images
        raise RequestError(422, f"{field}: not an image (allowed: {', '.join(ALLOWED_FORMATS)})") from None
    if img.format not in ALLOWED_FORMATS:
        allowed = ", ".join(ALLOWED_FORMATS)
        raise RequestError(422, f"{field}: {img.format} images are not accepted (allowed: {allowed})")
    width, height = img.size
    if width * height > config.max_pixels:
        raise RequestError(
            413, f"{field}: image of {width}x{height} pixels exceeds the cap of {config.max_pixels} pixels"
        )
    try:
        img.load()
        return load_mask(img) if mask else load_image(img)
    except Exception as err:
        raise RequestError(422, f"{field}: corrupt or truncated image ({err})") from None
