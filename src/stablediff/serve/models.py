"""The models a server offers: the bundled model, the presets (random weights) and the checkpoint
files and diffusers folders directly inside ``--models DIR``. Requests name a model by its name
from this list, never by a path, so a client cannot make the server open an arbitrary file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stablediff import PRESETS  # the preset names, from the public API
from stablediff.loading import BUNDLED_NAME, MODEL_FILE_SUFFIXES, load_pipeline, model_hash


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what clients send: "shapes", "tiny", "sd15.safetensors", "sd15-diffusers"
    ref: str  # what load_pipeline takes: a preset name or a path
    kind: str  # "bundled", "preset", "file", "diffusers"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind}


def list_models(models_dir: Path | None, startup: str | None) -> list[ModelEntry]:
    """Every model this server may load; ``startup`` (the --model given) is offered too."""
    entries = [ModelEntry(BUNDLED_NAME, BUNDLED_NAME, "bundled")]
    entries += [ModelEntry(name, name, "preset") for name in PRESETS]
    if models_dir is not None and models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in MODEL_FILE_SUFFIXES:
                entries.append(ModelEntry(path.name, str(path), "file"))
            elif path.is_dir() and ((path / "model_index.json").exists() or (path / "unet").is_dir()):
                entries.append(ModelEntry(path.name, str(path), "diffusers"))
    if startup is not None and all(startup not in (e.name, e.ref) for e in entries):
        path = Path(startup)
        entries.append(ModelEntry(path.name, startup, "diffusers" if path.is_dir() else "file"))
    return entries


def find_model(entries: list[ModelEntry], name: str) -> ModelEntry:
    """The entry called ``name`` (its name, or the A1111 title "name [hash]"); ValueError otherwise."""
    base = name.rsplit(" [", 1)[0] if name.endswith("]") else name
    for entry in entries:
        if base in (entry.name, Path(entry.name).stem) or name == entry.ref:
            return entry
    raise ValueError(f"unknown model {name!r}; available: {', '.join(e.name for e in entries)}")


def load_entry(entry: ModelEntry, device: str = "cpu"):
    """(pipeline, hash or None). Any failure is a ValueError naming the model."""
    try:
        pipe = load_pipeline(entry.ref, device=device)
        digest = model_hash(pipe.source) if pipe.source else None
    except Exception as err:  # a broken file can fail in many ways; the server keeps running
        raise ValueError(f"cannot load model {entry.name!r}: {err}") from None
    return pipe, digest
