"""The settings of one server (what `stablediff serve` takes on its command line)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """model: the model loaded at start (a file, a diffusers folder, a preset or None for the
    default); models_dir: a folder of more checkpoints to offer; outputs: the folder of PNGs, inputs
    and ``jobs.sqlite3``. Caps: ``max_body`` bytes per request, ``max_upload`` bytes and
    ``max_pixels`` pixels per uploaded image, ``max_queue`` jobs waiting per model."""

    model: str | None = None
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    outputs: Path = Path("outputs")
    api_key: str | None = None
    max_body: int = 20 * 1024 * 1024
    max_upload: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_queue: int = 16
    preview_every: int = 2
    device: str = "cpu"
    extra_hosts: tuple[str, ...] = field(default=())
    lora_dir: Path | None = None  # the LoRA files prompts' <lora:name:w> tags name
    embeddings_dir: Path | None = None  # embeddings, loaded when a prompt names one

    def check(self) -> ServeConfig:
        """Raise ValueError for a configuration that is refused (e.g. an open bind without a key)."""
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"refusing to listen on {self.host}, which is not a loopback address, without --api-key: "
                "anyone who can reach it could use this machine. Pass --api-key KEY (clients then send "
                "'X-API-Key: KEY' or 'Authorization: Bearer KEY'), or bind to 127.0.0.1"
            )
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key must be at least 8 characters")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        return self

    def allowed_hosts(self) -> set[str]:
        """Host header names (without port) that requests may carry: loopback names and the bound host."""
        names = {*LOOPBACK_NAMES, self.host.strip("[]").lower(), *(h.lower() for h in self.extra_hosts)}
        return names
