"""Generated images written as PNGs that carry their parameters: AUTOMATIC1111's ``parameters``
text and our ``stablediff`` record (the command line and the web server write them alike)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image

from stablediff.image import save_png
from stablediff.loading import BUNDLED_NAME, bundled_model_path, model_hash
from stablediff.params import GenerationParams


class ImageWriter:
    """Writes image k of a pipeline's last run with its parameters, model, LoRAs and embeddings.
    ``digest``: the model's hash when the caller has it already (hashing a large file takes time).
    ``refiner``: the SDXL refiner pipeline that took over from ``switch_at``, recorded with it."""

    def __init__(self, pipe, digest: str | None = None, refiner=None, switch_at: float | None = None):
        self.pipe = pipe
        self.name, self.model_ref, self.digest = _model_names(pipe, digest)
        self.refiner = None
        if refiner is not None:
            name, ref, refiner_digest = _model_names(refiner)
            self.refiner = {"model": name, "model_file": ref, "model_hash": refiner_digest, "switch_at": switch_at}

    def write(self, image: Image.Image, params: GenerationParams, k: int, path: Path, overwrite: bool) -> Path:
        """Image ``k`` of a run of ``params`` (seed + k) at ``path``, atomically."""
        one = replace(params, seed=params.seed + k, batch_size=1, latents=None)
        addons = {"loras": self.pipe.last_loras, "embeddings": self.pipe.last_embeddings, "refiner": self.refiner}
        record = one.to_record(model=self.name, model_file=self.model_ref, model_hash=self.digest, **addons)
        if params.latents is not None:
            record["params"]["latents_given"] = True
        text = one.to_a1111(model_hash=self.digest, model_name=self.name, **addons)
        return save_png(image, path, text, record, overwrite=overwrite)


def _model_names(pipe, digest: str | None = None) -> tuple[str, str, str | None]:
    """A model's name (its file's stem, or the preset's name), the reference a record keeps (a
    preset by itself, the bundled model by its name, a file by its path: ``to_record`` keeps the
    file name) and its hash (None for a preset)."""
    if digest is None and pipe.source:
        digest = model_hash(pipe.source)
    name = Path(pipe.source).stem if pipe.source else pipe.spec.name
    bundled = pipe.source is not None and Path(pipe.source) == bundled_model_path()
    return name, BUNDLED_NAME if bundled else (pipe.source or pipe.spec.name), digest
