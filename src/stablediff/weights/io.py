"""Reading and writing weight files safely.

Formats are told apart by their bytes, never by the file name:

- ``safetensors``: 8-byte little-endian header length N, N bytes of JSON, then raw data. The
  header is validated here (sizes, dtypes, offsets, overlaps, truncation) before the file is
  handed to the ``safetensors`` library, which memory-maps it.
- ``torch-zip``: the ``torch.save`` zip archive (``<name>/data.pkl`` + ``<name>/data/<key>``).
- ``pickle``: the legacy ``torch.save`` stream (``_use_new_zipfile_serialization=False``).

Both pickle formats go through the restricted unpickler in :mod:`stablediff.weights.unpickle`;
see its docstring for what it accepts. Nothing here knows checkpoint key names (that is
``weights/convert.py``). Writes go to a temporary file in the same folder, are fsync'ed and then
renamed, so a failed or killed write never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from typing import Union

import safetensors
import safetensors.torch
import torch

from stablediff.errors import BadFileError
from stablediff.weights.unpickle import RefusedCheckpoint, load_legacy_pickle, load_torch_zip

__all__ = [
    "CheckpointError",
    "detect_format",
    "read_state_dict",
    "read_metadata",
    "write_safetensors",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "file_mode",
]

PathLike = Union[str, "os.PathLike[str]"]

_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header
# safetensors dtype name -> torch dtype; only byte-sized types torch can hold.
_ST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "F16": "float16",
        "BF16": "bfloat16",
        "I32": "int32",
        "U32": "uint32",
        "F32": "float32",
        "I64": "int64",
        "U64": "uint64",
        "F64": "float64",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }.items()
    if hasattr(torch, attr)
}


class CheckpointError(BadFileError):
    """A weight file is missing, unreadable, malformed or unsafe; the message names the path."""


# ---------------------------------------------------------------------------------------------
# Format detection
def _check_file(path: str) -> int:
    """Return the size of ``path``, or raise CheckpointError if it is not a regular file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a weight file")
    return os.path.getsize(path)


def detect_format(path: PathLike) -> str:
    """Return ``"safetensors"``, ``"torch-zip"`` or ``"pickle"``, decided from the first bytes.

    Raises CheckpointError for an empty file, a Git LFS pointer, or anything else.
    """
    path = os.fspath(path)
    size = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a weight file")
    if head.startswith(_LFS_MAGIC):
        raise CheckpointError(
            f"{path}: is a Git LFS pointer file ({size} bytes), not the weights themselves; "
            "run `git lfs pull` in the repository (or download the file directly)"
        )
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    # Byte 8 opens the JSON header. A pickle also starts with 0x80, which could be the low byte of
    # a header length, so then also ask for a length below 4 GiB (bytes 4..7 zero).
    if len(head) >= 9 and head[8:9] == b"{" and (head[0] != 0x80 or head[4:8] == b"\0\0\0\0"):
        return "safetensors"
    if head[0] == 0x80:
        return "pickle"
    hint = " (looks like an HTML page: a failed download?)" if head.lstrip().startswith(b"<") else ""
    raise CheckpointError(
        f"{path}: unrecognised format{hint}; first bytes {head[:16]!r} are not safetensors, "
        "a torch zip checkpoint or a torch pickle"
    )


# ---------------------------------------------------------------------------------------------
# safetensors header validation
def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate keys {dup[:5]}")
    return dict(pairs)


def _is_uint_list(value: object, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(type(v) is int and v >= 0 for v in value)
    )


def _safetensors_header(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Read and validate a safetensors header; return ({name: entry}, metadata).

    Checks everything the data section depends on, so that a bad file gets a message naming the
    tensor rather than a library error, and nothing is trusted before it is checked.
    """
    size = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise CheckpointError(
                f"{path}: safetensors header length {n} bytes is absurd (limit {_MAX_HEADER}); "
                f"the file is {size} bytes: corrupt, or not a safetensors file"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: safetensors header length {n} bytes is larger than the file "
                f"({size} bytes): the file is truncated or corrupt"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")

    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(_ST_DTYPES)})"
            )
        if not _is_uint_list(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
        if not _is_uint_list(offsets, 2) or offsets[0] > offsets[1]:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        need = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if end - begin != need:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes "
                f"but shape {shape} of {dtype} needs {need}"
            )
        spans.append((begin, end, name))

    data_len = size - 8 - n
    covered, owner = 0, None  # end of the data claimed so far, and which tensor claimed it
    for begin, end, name in sorted(spans):
        if begin == end:
            continue  # empty tensors occupy no bytes and cannot overlap
        if begin < covered:
            raise CheckpointError(
                f"{path}: tensors {owner!r} and {name!r} have overlapping data_offsets "
                f"({name!r} starts at byte {begin}, {owner!r} ends at byte {covered})"
            )
        if begin > covered:
            raise CheckpointError(f"{path}: gap of {begin - covered} bytes before tensor {name!r}")
        if end > data_len:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"but only {data_len} bytes follow the header"
            )
        covered, owner = end, name
    if covered != data_len:
        raise CheckpointError(f"{path}: {data_len - covered} unexpected bytes after the last tensor")
    return header, metadata


# ---------------------------------------------------------------------------------------------
# Reading
def _state_dict_from_object(obj: object, path: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": {...}, ...}`` and keep only ``str -> Tensor`` entries."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: top-level object is a {type(obj).__name__}, expected a dict of tensors")
    inner = obj.get("state_dict")
    if isinstance(inner, dict):
        obj = inner
    # detach() gives fresh tensor objects, so nothing a pickle attached to the ones it built
    # (requires_grad, hooks, attributes) survives.
    tensors = {k: v.detach() for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if obj and not tensors:
        keys = [str(k) for k in list(obj)[:8]]
        raise CheckpointError(f"{path}: no tensors found at the top level (keys: {keys})")
    return tensors


def read_state_dict(path: PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a weight file into ``{name: tensor}`` on ``device``.

    Accepts safetensors (validated, then memory-mapped by the library), torch zip checkpoints and
    legacy torch pickles (restricted unpickler; a ``.ckpt``'s ``"state_dict"`` is unwrapped, and
    non-tensor entries are dropped). Dtypes are kept as stored. Raises CheckpointError.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        _safetensors_header(path)
        try:
            return safetensors.torch.load_file(path, device=str(device))
        except Exception as exc:  # the library's SafetensorError carries no path
            raise CheckpointError(f"{path}: safetensors could not read the file: {exc}") from exc
    try:
        obj = load_torch_zip(path) if fmt == "torch-zip" else load_legacy_pickle(path)
    except RefusedCheckpoint as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # pickle/zip/struct errors: the file is damaged
        raise CheckpointError(f"{path}: corrupt {fmt} checkpoint: {type(exc).__name__}: {exc}") from exc
    tensors = _state_dict_from_object(obj, path)
    return {k: v.to(device) for k, v in tensors.items()}


def read_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes from a safetensors file's (checked) header, without reading any data."""
    return {name: tuple(entry["shape"]) for name, entry in _safetensors_header(os.fspath(path))[0].items()}


def read_metadata(path: PathLike) -> dict[str, str]:
    """Return the ``__metadata__`` of a safetensors file; ``{}`` for the other formats."""
    path = os.fspath(path)
    if detect_format(path) != "safetensors":
        return {}
    return dict(_safetensors_header(path)[1])


# ---------------------------------------------------------------------------------------------
# Writing
def current_umask() -> int:
    """The process umask, read without changing it where possible (Linux: /proc/self/status).

    Elsewhere it is set and restored at once, which another thread creating a file in between
    could notice; that is the only portable way.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """The mode ``open()`` or ``mkdir()`` would give a new file or folder: 0o666 (0o777) less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _make_temp(folder: str, base: str) -> str:
    """Create an empty, uniquely named file next to the target (O_EXCL, mode 0o666 & ~umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (POSIX); some filesystems refuse, which is harmless."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: PathLike) -> Iterator[str]:
    """Yield a temp path in the target's folder; on success rename it onto ``path``.

    The body must write and fsync the temp file. On any exception the temp file is removed and
    ``path`` is left as it was. The file gets the mode the umask gives a new file (writers such as
    the safetensors library create theirs 0o600).
    """
    final = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(final))
    tmp = _make_temp(folder, os.path.basename(final))
    try:
        yield tmp
        if os.name == "posix":
            os.chmod(tmp, file_mode())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + flush + fsync + rename."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check types, make tensors contiguous, and clone ones that share memory with another."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to Tensor, got {type(tensors).__name__}")
    supported = set(_ST_DTYPES.values())
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r} ({type(name).__name__})")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided or t.device.type == "meta":
            raise ValueError(f"tensor {name!r} ({t.layout}, {t.device}) has no dense data to save")
        if t.dtype not in supported:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        t = t.detach().contiguous()
        # safetensors refuses tensors that share a storage (tied weights, views of a fused
        # tensor), so every tensor after the first on a storage gets its own copy.
        key = (t.device, t.untyped_storage().data_ptr())
        if t.untyped_storage().nbytes() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (with optional string ``metadata``) to ``path`` as safetensors, atomically.

    Arguments are checked before any file is created (TypeError / ValueError); the data goes to
    a temporary file in the same folder, is fsync'ed and renamed onto ``path``.
    """
    prepared = _prepare_tensors(tensors)
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("safetensors metadata must map str to str")
    with _atomic_target(path) as tmp:
        try:
            safetensors.torch.save_file(prepared, tmp, metadata=meta or None)
        except safetensors.SafetensorError as exc:  # a full disk, a quota: the library's own error type
            raise _write_error(path, exc) from exc
        with open(tmp, "rb+") as f:  # the library closed its own handle; fsync through ours
            os.fsync(f.fileno())


def _write_error(path: PathLike, exc: Exception) -> OSError:
    """An OSError naming ``path`` for a failed safetensors write, with the errno the library reports
    (its message ends "(os error 28)" for a full disk)."""
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return OSError(f"cannot write {os.fspath(path)}: {exc}")
    code = int(found.group(1))
    return OSError(code, f"cannot write {os.fspath(path)}: {os.strerror(code)}")
