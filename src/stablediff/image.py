"""Images in and out: robust loading, PIL <-> tensor conversions, masks, PNG files with metadata.

Conversions follow diffusers' ``VaeImageProcessor`` step for step (LANCZOS resize, ``/255``,
``2x-1``; ``(x*0.5+0.5).clamp(0,1)``, ``*255``, ``round``) so that the same tensor gives the same
uint8 pixels as the reference pipeline.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from stablediff.errors import BadFileError, load_json

ImageInput = Image.Image | str | os.PathLike[str]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes for 16-bit grayscale data
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_NUMBERED = re.compile(r"^(\d+)")


def load_image(source: ImageInput) -> Image.Image:
    """An RGB image from a path or a PIL image, ready for ``resize_for_model``.

    EXIF orientation is applied; transparency is composited onto white; grayscale, palette,
    1-bit and CMYK become RGB; 16-bit grayscale is scaled to 8 bits (value / 257, rounded), not
    clipped as PIL's own conversion does. (PIL reads 16-bit RGB PNGs as 8-bit RGB itself.)
    Raises ``ValueError`` naming the path for a missing, empty, corrupt or non-image file.
    """
    img = _open(source)
    if img.mode in _SIXTEEN_BIT:
        return _to_8bit(img).convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_mask(source: ImageInput) -> Image.Image:
    """A mode "L" mask (white = repaint) from a path or a PIL image, with ``load_image``'s checks.

    The mask is the luminance (ITU-R 601, PIL's ``convert("L")``, as diffusers uses). Transparent
    pixels count as black (keep), so a white-on-transparent brush layer works as a mask.
    """
    img = _open(source)
    if img.mode in _SIXTEEN_BIT:
        return _to_8bit(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return img if img.mode == "L" else img.convert("L")


def resize_for_model(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to exactly ``width`` x ``height`` with LANCZOS, as diffusers' preprocess does
    (aspect ratio is not kept; crop or pad beforehand to keep it)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    return img.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def image_to_tensor(img: Image.Image) -> Tensor:
    """PIL image -> ``[1, 3, H, W]`` float32 in [-1, 1] (non-RGB images go through ``load_image``)."""
    if img.mode != "RGB":
        img = load_image(img)
    array = np.array(img).astype(np.float32) / 255.0  # [H, W, 3] in [0, 1]
    x = torch.from_numpy(array.transpose(2, 0, 1)[None].copy())
    return 2.0 * x - 1.0  # in torch, like diffusers' normalize, for identical bits


def tensor_to_images(x: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [-1, 1] (any float dtype/device) -> B RGB images; values outside the range
    are clamped. Raises ``ValueError`` on NaN/inf (e.g. an fp16 VAE overflow) instead of saving noise."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a [B, 3, H, W] image tensor, got {got}")
    x = x.detach()
    if not torch.isfinite(x).all():
        raise ValueError("image tensor contains NaN or inf")
    x = (x * 0.5 + 0.5).clamp(0, 1)  # same op order and dtype as diffusers' denormalize
    array = x.cpu().permute(0, 2, 3, 1).float().numpy()
    array = (array * 255).round().astype("uint8")  # numpy, as diffusers' numpy_to_pil
    return [Image.fromarray(a) for a in array]


def mask_to_tensor(mask: ImageInput, width: int, height: int) -> Tensor:
    """Mask -> ``[1, 1, height, width]`` float32 of 0.0 (keep) and 1.0 (repaint).

    An "L" or "RGB" PIL image follows diffusers' mask processor exactly: LANCZOS resize in its own
    mode, ``convert("L")``, ``/255``, then binarise (``>= 0.5`` -> 1). Other inputs go through
    ``load_mask`` first.
    """
    if not (isinstance(mask, Image.Image) and mask.mode in ("L", "RGB")):
        mask = load_mask(mask)
    gray = resize_for_model(mask, width, height).convert("L")
    x = torch.from_numpy(np.array(gray).astype(np.float32) / 255.0)[None, None]
    return (x >= 0.5).to(torch.float32)


def save_png(
    image: Image.Image,
    path: str | os.PathLike[str],
    params_text: str,
    params_json: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``image`` as a PNG with two text chunks and return its path.

    ``parameters``: ``params_text`` (AUTOMATIC1111's chunk; tEXt, or iTXt if not Latin-1).
    ``stablediff``: ``params_json`` as JSON in an iTXt chunk.
    The file is written under a temporary name in the same folder and renamed, so a reader never
    sees half a file; nothing is left behind on failure. An existing file is an error
    (``FileExistsError``) unless ``overwrite``; a missing, non-folder or read-only folder raises an
    ``OSError`` naming the folder.
    """
    path = Path(path)
    folder = path.parent
    payload = json.dumps(params_json, ensure_ascii=False, allow_nan=False)  # fails before any write
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params_text)
    info.add_itxt("stablediff", payload)
    if not folder.exists():
        raise FileNotFoundError(f"cannot save {path.name}: folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot save {path.name}: {folder} is not a folder")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    temp = folder / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        try:
            # 0o666 and the umask decide the mode, as for any file (mkstemp would give 0o600).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as err:  # EACCES, EROFS...: the same error type, naming the folder
            why = f"cannot save {path.name}: folder {folder} is not writable ({err.strerror or err})"
            raise (type(err)(err.errno, why) if err.errno else type(err)(why)) from err
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(temp, path, overwrite)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def _publish(temp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temp, path)
        return
    # A hard link never replaces an existing file, so a file created since the check above is kept.
    try:
        os.link(temp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # no hard links here (FAT, some network shares): checked rename instead
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(temp, path)


def read_png_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"parameters": str | None, "stablediff": dict | None}`` from a PNG written by ``save_png``
    (or by A1111, which writes only ``parameters``). ``ValueError`` for non-PNG or broken files;
    a ``stablediff`` chunk that is not a JSON object (or nests too deeply) is a BadFileError.
    The text is a stranger's: print it through ``errors.printable``."""
    img = _open_file(Path(path))
    if img.format != "PNG":
        raise ValueError(f"{path} is a {img.format} file, not a PNG")
    text = getattr(img, "text", {})
    raw = text.get("stablediff")
    data = None
    if raw is not None:
        data = load_json(raw, f"{path}: the stablediff chunk")
        if not isinstance(data, dict):
            raise BadFileError(f"{path}: the stablediff chunk is a JSON {type(data).__name__}, not an object")
    return {"parameters": text.get("parameters"), "stablediff": data}


def unique_path(folder: str | os.PathLike[str], stem: str, suffix: str = ".png") -> Path:
    """``folder/NNNNN-stem.png`` with NNNNN one more than the highest number that starts a file
    name in ``folder`` (A1111's numbering), skipping any name that exists. ``save_png`` with
    ``overwrite=False`` still refuses a name another process took in the meantime."""
    if not isinstance(stem, str) or "/" in stem or os.sep in stem or stem in (".", ".."):
        raise ValueError(f"stem must be a file name without folders, got {stem!r}")
    folder = Path(folder)
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    numbers = [int(m.group(1)) for m in map(_NUMBERED.match, names) if m]
    n = max(numbers, default=-1) + 1
    while True:
        candidate = folder / (f"{n:05d}-{stem}{suffix}" if stem else f"{n:05d}{suffix}")
        if not candidate.exists():
            return candidate
        n += 1


def _open(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (str, os.PathLike)):
        img = _open_file(Path(source))
    else:
        raise TypeError(f"expected a PIL image or a path, got {type(source).__name__}")
    return ImageOps.exif_transpose(img)  # a copy, rotated upright when EXIF says so


def _open_file(path: Path) -> Image.Image:
    """Open and fully decode ``path``; every failure is a ``ValueError`` naming the path."""
    if not path.exists():
        raise ValueError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here rather than later
    except Image.UnidentifiedImageError:
        kind = _signature(path)
        if kind:  # PIL says "unidentified" for a damaged header too; name the real problem
            raise ValueError(f"corrupt or truncated image file: {path} (a {kind} file PIL cannot decode)") from None
        raise ValueError(f"not an image file (format not recognised): {path}") from None
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large to open safely: {path} ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL's ways of saying "corrupt"
        raise ValueError(f"corrupt or truncated image file: {path} ({err})") from None
    return img


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _signature(path: Path) -> str | None:
    """The format a file's first bytes claim (WebP: "RIFF....WEBP"), or None."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)


def _has_alpha(img: Image.Image) -> bool:
    # "transparency" in info: a palette with transparent entries, or an RGB/L colour key (tRNS).
    return img.mode in _ALPHA or "transparency" in img.info


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale -> "L" by value / 257 (65535 -> 255), rounded. PIL's convert would clip
    everything above 255 to white. Mode "I" is assumed to hold 16-bit data; outside 0..65535 clips."""
    values = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))  # 2-D uint8: "L"
