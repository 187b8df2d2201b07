"""Reading ``torch.save`` checkpoints (zip and legacy formats) through a restricted unpickler.

A pickle is a small program: its only ways to reach Python code are ``find_class`` (the
GLOBAL / STACK_GLOBAL / INST / EXT opcodes) and ``persistent_load`` (PERSID). REDUCE, NEWOBJ
and BUILD can only call what those two handed out. So we answer every ``find_class`` with
something of our own and never import or call anything the file names.

Policy, by the global the file asks for:

1. **Tensor rebuild functions** (``torch._utils._rebuild_tensor_v2`` and friends,
   ``torch._tensor._rebuild_from_type_v2``, ``torch._utils._rebuild_parameter``): replaced by
   our own functions that check their arguments and return a strided view of a storage we read
   ourselves, with bounds checked against the storage size. Parameters come back as plain
   tensors; ``requires_grad``, hooks and Python attributes are dropped.
2. **Inert values**: storage classes (``torch.FloatStorage``, ``torch.cuda.HalfStorage``,
   ``torch.storage.UntypedStorage``, ...) become dtype markers; dtypes and layouts are looked up
   in fixed tables; ``torch.Size``, ``torch.device``, ``collections.OrderedDict``,
   ``builtins.set/frozenset/bytearray/complex`` and ``_codecs.encode`` (protocol 2 spells
   ``bytes`` that way; only latin-1) are rebuilt from type-checked arguments.
3. **Known training bookkeeping** (anything under ``pytorch_lightning``, ``lightning``,
   ``lightning_fabric``, ``omegaconf``, ``numpy``; ``argparse.Namespace``; ``typing.Any``):
   replaced by a placeholder class created fresh for this load. Constructing it, BUILD-ing it or
   adding items to it only records the arguments; it has no other behaviour. Real SD ``.ckpt``
   files carry ``ModelCheckpoint`` callback state and numpy scalars in these places, and they
   are dropped anyway because only tensors are returned.
4. **Everything else** (``posix.system``, ``builtins.exec``, ``subprocess.Popen``,
   ``torch.load``, ``nn.Module`` classes, ...): ``find_class`` raises at once, naming
   ``module.name``; the module is never imported and the object never called.

Why not ``torch.load(weights_only=True)``: accepting the Lightning/numpy bookkeeping of real
checkpoints would need ``torch.serialization.add_safe_globals`` or the ``safe_globals`` context
manager, both of which change process-wide torch state (and need those packages importable);
its error wording changes between torch versions; and it calls torch's own rebuild functions
with the file's arguments. This module depends on no torch internals beyond the public tensor API.

Memory: a tensor is a view of the bytes of its storage and never holds more elements than its
storage has bytes for, so a stride-0 or overlapping view (which would turn a few bytes into
gigabytes as soon as anything copies it) is refused, as is a device tensor whose dtype differs from
its data's (torch writes the same dtype; converting would materialise a copy). All the tensors of
one load together may not hold more than ``_VIEW_FACTOR`` times the bytes of the storages read
(tied weights and slices of a fused tensor share storage) plus ``_PER_STORAGE`` per storage and
``_SLACK``, each tensor counting ``_PER_TENSOR`` bytes more. Storage sizes are checked against the
file before anything is allocated: a zip entry must hold exactly the bytes the pickle expects, no
two zip entries may overlap (one compressed block listed a thousand times would otherwise be read a
thousand times), and a legacy file's storages may not add up to more than the file.

Errors are raised as :class:`RefusedCheckpoint` (no path); ``io.py`` turns them into
``CheckpointError`` with the path.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from typing import IO, Any

import torch

__all__ = ["RefusedCheckpoint", "RestrictedUnpickler", "load_torch_zip", "load_legacy_pickle"]


class RefusedCheckpoint(Exception):
    """Something in a pickled checkpoint is unsafe or malformed (the caller adds the path)."""


# ---------------------------------------------------------------------------------------------
# Tables built from torch's public namespace once, so find_class never calls getattr on a module
# (torch's module __getattr__ imports submodules lazily).
_DTYPES: dict[str, torch.dtype] = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
_LAYOUTS: dict[str, torch.layout] = {f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.layout)}
# Legacy typed-storage class names -> element dtype. UntypedStorage counts bytes.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}
_INERT_MODULE_PREFIXES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy")
_INERT_GLOBALS = {("argparse", "Namespace"), ("typing", "Any")}
_CHUNK = 16 << 20  # bytes copied per read, so a storage never needs a second full-size buffer
_VIEW_FACTOR = 4  # all tensors of a load may hold this many times the bytes of its storages ...
_PER_STORAGE = 2048  # ... plus this much per storage ...
_SLACK = 1 << 20  # ... plus this much, where each tensor also costs _PER_TENSOR (object, shape, strides)
_PER_TENSOR = 512
_MAX_PICKLE = 64 << 20  # a state dict's data.pkl is kilobytes to a few megabytes


class _Marker:
    """A non-callable stand-in (storage type, tensor type). BUILD on it is refused."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype | None = None) -> None:
        self.name = name
        self.dtype = dtype

    def __setstate__(self, state: object) -> None:
        raise RefusedCheckpoint(f"the pickle tries to modify the global '{self.name}'")

    def __repr__(self) -> str:
        return f"<{self.name}>"


class _Handler(_Marker):
    """A callable we hand out instead of a real global; it calls our own checked function."""

    __slots__ = ("fn",)

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        super().__init__(name)
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class InertObject:
    """Placeholder for a known bookkeeping object (e.g. a Lightning ``ModelCheckpoint``).

    Subclassed per load with the original name in ``origin``. It only records what the pickle
    gives it (constructor arguments, BUILD state, items); none of it is ever interpreted.
    """

    __slots__ = ("args", "kwargs", "state", "items")
    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything was recorded by __new__; REDUCE calls cls(*args) which lands here

    def __setstate__(self, state: object) -> None:
        self.state = state

    def __setitem__(self, key: object, value: object) -> None:  # SETITEMS on a dict subclass
        self.items.append((key, value))

    def append(self, value: object) -> None:  # APPENDS on a list subclass
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<inert placeholder for {self.origin}>"


class _Budget:
    """The bytes one load has read into storages, and those its tensors hold (see the docstring)."""

    __slots__ = ("storage_bytes", "storages", "tensor_bytes")

    def __init__(self) -> None:
        self.storage_bytes = self.storages = self.tensor_bytes = 0

    def add_storage(self, nbytes: int) -> None:
        self.storage_bytes += nbytes
        self.storages += 1

    def charge(self, nbytes: int) -> None:
        self.tensor_bytes += nbytes + _PER_TENSOR
        limit = _VIEW_FACTOR * self.storage_bytes + _PER_STORAGE * self.storages + _SLACK
        if self.tensor_bytes > limit:
            raise RefusedCheckpoint(
                f"the tensors would hold {self.tensor_bytes} bytes, more than the {self.storage_bytes} bytes "
                f"of the file's {self.storages} storages allow (at most {limit}): a memory bomb, or views "
                "of one storage repeated many times"
            )


class _Storage:
    """Raw bytes of one saved storage; tensors are strided views of ``data`` (uint8, 1-D)."""

    __slots__ = ("key", "dtype", "nbytes", "data", "filled", "budget")

    def __init__(self, key: str, dtype: torch.dtype, nbytes: int, data: torch.Tensor, budget: _Budget) -> None:
        self.key, self.dtype, self.nbytes, self.data, self.filled = key, dtype, nbytes, data, False
        self.budget = budget

    def view(self, dtype: torch.dtype, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        item = dtype.itemsize
        if self.nbytes % item:
            raise RefusedCheckpoint(f"storage {self.key!r} has {self.nbytes} bytes, not a whole number of {dtype}")
        numel = self.nbytes // item
        if 0 in size:
            if math.prod(s for s in size if s) >= 1 << 62:
                raise RefusedCheckpoint(f"tensor size {list(size)} is absurd")
            self.budget.charge(0)
            return torch.empty(size, dtype=dtype)
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if last >= numel:
            raise RefusedCheckpoint(
                f"tensor of size {list(size)}, stride {list(stride)} and offset {offset} reaches element "
                f"{last} of storage {self.key!r}, which has only {numel} elements of {dtype}"
            )
        want = math.prod(size) * item
        if want > self.nbytes:  # only a stride-0 or overlapping view has more elements than its storage
            raise RefusedCheckpoint(
                f"tensor of size {list(size)} and stride {list(stride)} would hold {want} bytes but its storage "
                f"{self.key!r} has only {self.nbytes}: a stride-0 or overlapping view (a memory bomb) is refused"
            )
        self.budget.charge(want)
        return torch.as_strided(self.data.view(dtype), size, stride, offset)


# ---------------------------------------------------------------------------------------------
# Our replacements for the globals a torch pickle uses. Each checks its argument types.
def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise RefusedCheckpoint(f"tensor {what} must be a tuple of non-negative ints, got {value!r:.80}")
    return tuple(value)


def _rebuild(storage: object, offset: object, size: object, stride: object, dtype: object = None):
    if not isinstance(storage, _Storage):
        raise RefusedCheckpoint(f"a tensor is rebuilt from {type(storage).__name__}, not from a saved storage")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or type(offset) is not int or offset < 0:
        raise RefusedCheckpoint(f"bad tensor dtype {dtype!r:.40} or storage offset {offset!r:.40}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise RefusedCheckpoint(f"tensor size {list(size)} and stride {list(stride)} differ in length")
    return storage.view(dtype, offset, size, stride)


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _rebuild(storage, offset, size, stride)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild(storage, offset, size, stride, dtype)


def _tensor_arg(data: object) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise RefusedCheckpoint(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return _tensor_arg(data)


def _rebuild_from_type(func, new_type, args, state=None):
    if not (isinstance(func, _Handler) and func.name in _TENSOR_BUILDERS):
        raise RefusedCheckpoint(f"_rebuild_from_type with {func!r:.60}")
    if not (isinstance(new_type, _Marker) and new_type.name in _TENSOR_TYPES) or not isinstance(args, tuple):
        raise RefusedCheckpoint(f"_rebuild_from_type to {new_type!r:.60}")
    return func(*args)


def _rebuild_device_tensor(data, dtype, device=None, requires_grad=False):
    # torch writes (tensor.cpu(), tensor.dtype, ...): the dtype is the data's own. A different one
    # would make a converted copy here, as large as the file asks.
    if not isinstance(dtype, torch.dtype) or dtype != _tensor_arg(data).dtype:
        raise RefusedCheckpoint(f"device tensor of dtype {dtype!r:.40} rebuilt from data of another dtype")
    return data  # stays on the CPU; read_state_dict moves it


def _device(*args: object) -> torch.device:
    if not 1 <= len(args) <= 2 or not all(type(a) in (str, int) for a in args):
        raise RefusedCheckpoint(f"bad torch.device arguments {args!r:.80}")
    return torch.device(*args)


def _size(dims: object = ()) -> torch.Size:
    return torch.Size(_ints(dims, "Size"))


def _layout(name: object) -> torch.layout:
    if name not in _LAYOUTS:
        raise RefusedCheckpoint(f"unknown layout {name!r:.40}")
    return _LAYOUTS[name]


def _ordered_dict(items: object = ()) -> collections.OrderedDict:
    if not isinstance(items, (list, tuple)):
        raise RefusedCheckpoint(f"OrderedDict built from {type(items).__name__}")
    return collections.OrderedDict(items)


def _container(kind: type) -> Callable[..., Any]:
    def build(items: object = ()) -> Any:
        if not isinstance(items, (list, tuple, set, frozenset, bytes, bytearray)):
            raise RefusedCheckpoint(f"{kind.__name__} built from {type(items).__name__}")
        return kind(items)

    return build


def _complex(real: object = 0.0, imag: object = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise RefusedCheckpoint("complex() from non-numbers")
    return complex(real, imag)


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Protocol-2 pickles (torch's default) write bytes objects as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise RefusedCheckpoint(f"_codecs.encode with encoding {encoding!r:.40}")
    return text.encode("latin-1")


_TENSOR_BUILDERS = {
    "torch._utils._rebuild_tensor": lambda s, o, size, stride: _rebuild(s, o, size, stride),
    "torch._utils._rebuild_tensor_v2": _rebuild_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor,
}
_TENSOR_TYPES = ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter")
_HANDLERS: dict[str, _Marker] = {
    **{name: _Handler(name, fn) for name, fn in _TENSOR_BUILDERS.items()},
    "torch._tensor._rebuild_from_type_v2": _Handler("torch._tensor._rebuild_from_type_v2", _rebuild_from_type),
    "torch._tensor._rebuild_from_type": _Handler("torch._tensor._rebuild_from_type", _rebuild_from_type),
    **{name: _Marker(name) for name in _TENSOR_TYPES},
    "torch.device": _Handler("torch.device", _device),
    "torch.Size": _Handler("torch.Size", _size),
    "torch.serialization._get_layout": _Handler("torch.serialization._get_layout", _layout),
    "collections.OrderedDict": _Handler("collections.OrderedDict", _ordered_dict),
    "builtins.set": _Handler("builtins.set", _container(set)),
    "builtins.frozenset": _Handler("builtins.frozenset", _container(frozenset)),
    "builtins.bytearray": _Handler("builtins.bytearray", _container(bytearray)),
    "builtins.complex": _Handler("builtins.complex", _complex),
    "_codecs.encode": _Handler("_codecs.encode", _codecs_encode),
    # Storage classes only ever appear inside persistent ids, where they stand for a dtype.
    # GPU-saved files name torch.cuda.*Storage; the data is read to the CPU all the same.
    **{
        f"{module}.{name}": _Marker(f"{module}.{name}", dtype)
        for module in ("torch", "torch.cuda", "torch.storage")
        for name, dtype in _STORAGE_DTYPES.items()
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that only resolves the globals described in the module docstring.

    ``storages`` receives each persistent id (a tuple) and returns a ``_Storage``; ``None`` means
    the stream must not contain persistent ids.
    """

    def __init__(self, file: IO[bytes], storages: Callable[[tuple], _Storage] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self._inert: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # Python 2 spelling; our override bypasses pickle's fix_imports
            module = "builtins"
        full = f"{module}.{name}"
        if full in _HANDLERS:
            return _HANDLERS[full]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if (module, name) in _INERT_GLOBALS or any(
            module == p or module.startswith(p + ".") for p in _INERT_MODULE_PREFIXES
        ):
            if full not in self._inert:  # a fresh class per load: nothing can leak between loads
                self._inert[full] = type(name, (InertObject,), {"__slots__": (), "origin": full})
            return self._inert[full]
        raise RefusedCheckpoint(
            f"refusing to unpickle the forbidden global '{full}': only tensor-rebuild functions and "
            "known inert bookkeeping classes are allowed, and calling it could run arbitrary code. "
            "Load checkpoints only from sources you trust, or ask for a .safetensors file"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None or not isinstance(pid, tuple):
            raise RefusedCheckpoint(f"unexpected persistent id {pid!r:.80}")
        return self._storages(pid)


def _storage_spec(pid: tuple, size: int) -> tuple[torch.dtype, str, int]:
    """Check ``("storage", type, key, location, numel, ...)``; return (dtype, key, nbytes)."""
    if len(pid) != size or pid[0] != "storage":
        raise RefusedCheckpoint(f"unsupported persistent id {pid!r:.80} (only tensor storages are allowed)")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _Marker) or storage_type.dtype is None:
        raise RefusedCheckpoint(f"persistent id names {storage_type!r:.60}, not a storage type")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise RefusedCheckpoint(f"bad storage key {key!r:.40} or size {numel!r:.40}")
    return storage_type.dtype, key, numel * storage_type.dtype.itemsize


def _read_exact(f: IO[bytes], storage: _Storage) -> None:
    """Fill ``storage.data`` from ``f`` in chunks; a short read means the file is truncated."""
    view = memoryview(storage.data.numpy())
    pos = 0
    while pos < storage.nbytes:
        got = f.readinto(view[pos : pos + _CHUNK])
        if not got:
            raise RefusedCheckpoint(f"storage {storage.key!r} is truncated: expected {storage.nbytes} bytes, got {pos}")
        pos += got
    storage.filled = True


def _check_zip_layout(zf: zipfile.ZipFile, path: str) -> None:
    """Refuse duplicate names and entries whose bytes overlap (each must own its local header and
    data, all before the central directory): otherwise one compressed block listed many times
    would be decompressed once per listing."""
    names = zf.namelist()
    if len(set(names)) != len(names):
        raise RefusedCheckpoint("zip archive lists the same entry name twice")
    spans = []
    with open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise RefusedCheckpoint(f"zip entry {info.filename!r} has no local header at byte {info.header_offset}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            end = info.header_offset + 30 + name_len + extra_len + info.compress_size
            spans.append((info.header_offset, end, info.filename))
    covered, owner = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise RefusedCheckpoint(
                f"zip entries {owner!r} and {name!r} overlap (bytes from {begin} are claimed twice): "
                "a decompression bomb, or a damaged archive"
            )
        covered, owner = end, name
    if covered > zf.start_dir:
        raise RefusedCheckpoint(f"zip entry {owner!r} runs into the archive's central directory")


def load_torch_zip(path: str) -> object:
    """Unpickle the top-level object of a zip-format ``torch.save`` file (tensors on the CPU)."""
    archive_size = os.path.getsize(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise RefusedCheckpoint(f"not a readable zip archive ({exc}); the download may be truncated") from exc
    with zf:
        _check_zip_layout(zf, path)
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise RefusedCheckpoint("zip archive has no '<name>/data.pkl': not a torch.save checkpoint")
        # torch names the archive after its first record, so prefer the pickle under that folder.
        first = names[0].split("/", 1)[0] + "/data.pkl"
        prefix = (first if first in pickles else pickles[0])[: -len("data.pkl")]
        if any(n.startswith(prefix + "code/") for n in names):
            raise RefusedCheckpoint("this is a TorchScript archive (torch.jit.save), not a state dict")
        if prefix + "byteorder" in names:
            if zf.getinfo(prefix + "byteorder").file_size > 16:
                raise RefusedCheckpoint("the byteorder entry is not 'little' or 'big'")
            if zf.read(prefix + "byteorder").strip() not in (b"", b"little"):
                raise RefusedCheckpoint("big-endian checkpoints are not supported")
        pickle_size = zf.getinfo(prefix + "data.pkl").file_size
        if pickle_size > _MAX_PICKLE:
            raise RefusedCheckpoint(f"data.pkl is {pickle_size} bytes; a state dict's pickle is under {_MAX_PICKLE}")
        storages: dict[str, _Storage] = {}
        budget = _Budget()

        def load_storage(pid: tuple) -> _Storage:
            dtype, key, nbytes = _storage_spec(pid, 5)
            if key in storages:
                return storages[key]
            entry = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(entry)
            except KeyError:
                raise RefusedCheckpoint(f"storage entry {entry!r} is missing from the archive") from None
            # Sizes are checked before allocating: a stored entry cannot be larger than the archive,
            # and deflate cannot expand by more than ~1032x (a zip bomb would claim more).
            if (
                info.file_size != nbytes
                or info.compress_size > archive_size
                or info.file_size > 1032 * info.compress_size + 1024
            ):
                raise RefusedCheckpoint(
                    f"storage entry {entry!r} holds {info.file_size} bytes, the pickle expects {nbytes}"
                )
            storage = _Storage(key, dtype, nbytes, torch.empty(nbytes, dtype=torch.uint8), budget)
            with zf.open(info) as f:
                _read_exact(f, storage)
            storages[key] = storage
            budget.add_storage(nbytes)
            return storage

        with zf.open(prefix + "data.pkl") as f:
            return RestrictedUnpickler(f, load_storage).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def load_legacy_pickle(path: str) -> object:
    """Unpickle a legacy (``_use_new_zipfile_serialization=False``) ``torch.save`` file.

    Layout: pickles of the magic number, the protocol version, a sys-info dict, the object
    itself (storages as persistent ids), and the list of storage keys; then, per key, an
    int64 element count and the raw little-endian bytes.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = RestrictedUnpickler(f).load()
        if type(magic) is not int or magic != _LEGACY_MAGIC:
            raise RefusedCheckpoint("this is a plain pickle, not a torch.save checkpoint (no torch magic number)")
        protocol = RestrictedUnpickler(f).load()
        if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
            raise RefusedCheckpoint(f"unsupported legacy torch protocol {protocol!r:.40}")
        sys_info = RestrictedUnpickler(f).load()
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise RefusedCheckpoint("big-endian or malformed legacy checkpoint header")

        storages: dict[str, _Storage] = {}
        budget = _Budget()
        total = 0

        def load_storage(pid: tuple) -> _Storage:
            nonlocal total
            if pid and pid[0] == "module":
                raise RefusedCheckpoint("the file pickles a whole nn.Module with its source; only state dicts load")
            dtype, key, nbytes = _storage_spec(pid, 6)
            if key not in storages:
                total += nbytes
                if total > file_size:  # checked before allocating: sizes come from the file
                    raise RefusedCheckpoint(f"storages declare {total} bytes but the file has {file_size}")
                storages[key] = _Storage(key, dtype, nbytes, torch.empty(nbytes, dtype=torch.uint8), budget)
                budget.add_storage(nbytes)
            root = storages[key]
            if pid[5] is None:
                return root
            view_key, offset, count = pid[5]  # a typed view into the root storage (old torch)
            begin, end = offset * dtype.itemsize, (offset + count) * dtype.itemsize
            if type(offset) is not int or type(count) is not int or not 0 <= begin <= end <= root.nbytes:
                raise RefusedCheckpoint(f"storage view {view_key!r:.40} lies outside storage {key!r}")
            view = _Storage(key, dtype, end - begin, root.data[begin:end], budget)
            view.filled = True  # filled through its root
            return view

        obj = RestrictedUnpickler(f, load_storage).load()
        keys = RestrictedUnpickler(f).load()
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise RefusedCheckpoint("malformed storage key list")
        for key in keys:
            if key not in storages:
                raise RefusedCheckpoint(f"data for storage {key!r}, which no tensor uses")
            storage = storages[key]
            header = f.read(8)
            if len(header) < 8:
                raise RefusedCheckpoint(f"file ends before the data of storage {key!r} (truncated)")
            count = int.from_bytes(header, "little", signed=True)
            if count * storage.dtype.itemsize != storage.nbytes:
                raise RefusedCheckpoint(
                    f"storage {key!r} has {count} elements in the file, the pickle expects "
                    f"{storage.nbytes // storage.dtype.itemsize}"
                )
            _read_exact(f, storage)
        missing = [k for k, s in storages.items() if not s.filled]
        if missing:
            raise RefusedCheckpoint(f"no data for storages {missing[:5]} (file truncated?)")
    return obj
