"""Tests for stablediff.weights.io: formats from bytes, header validation, safe unpickling, atomic writes."""

from __future__ import annotations

import argparse
import builtins
import collections
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy
import pytest
import torch

from stablediff.weights import io as wio
from stablediff.weights.io import (
    CheckpointError,
    atomic_write_text,
    detect_format,
    read_metadata,
    read_state_dict,
    write_safetensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(-3, 4, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)  # safetensors stores tensors in its own order
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(-1).view(torch.uint8), v.contiguous().view(-1).view(torch.uint8)), k


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- round trips -------------------------------------------------------------------------------
def test_safetensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    want = _tensors()
    write_safetensors(want, path, metadata={"spec": json.dumps({"a": 1}), "format": "pt"})
    _assert_bit_exact(read_state_dict(path), want)
    assert read_metadata(path) == {"spec": '{"a": 1}', "format": "pt"}
    assert _leftovers(tmp_path) == ["m.safetensors"]


def test_write_handles_views_and_shared_storage(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    want = {"a": base, "tied": base, "t": base.t(), "row": base[1]}
    write_safetensors(want, tmp_path / "s.safetensors")
    got = read_state_dict(tmp_path / "s.safetensors")
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_torch_zip_round_trip_and_ckpt_unwrap(tmp_path):
    want = _tensors()
    want["param"] = torch.nn.Parameter(torch.ones(2))
    want["transposed"] = torch.arange(6.0).reshape(2, 3).t()
    torch.save(want, tmp_path / "a.pt")
    got = read_state_dict(tmp_path / "a.pt")
    assert not got["param"].requires_grad and type(got["param"]) is torch.Tensor
    assert torch.equal(got["transposed"], want["transposed"])
    _assert_bit_exact({k: got[k] for k in _tensors()}, _tensors())

    sd = collections.OrderedDict(_tensors())
    torch.save({"state_dict": sd, "global_step": 5, "epoch": 1}, tmp_path / "b.ckpt")
    _assert_bit_exact(read_state_dict(tmp_path / "b.ckpt"), _tensors())
    assert read_metadata(tmp_path / "b.ckpt") == {}


def test_module_state_dict_with_tied_views(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    sd = model.state_dict()  # an OrderedDict with a _metadata attribute (BUILD opcode)
    sd["alias"] = sd["0.weight"]
    torch.save(sd, tmp_path / "m.pt")
    got = read_state_dict(tmp_path / "m.pt")
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_legacy_pickle_format(tmp_path):
    want = _tensors()
    torch.save({"state_dict": want, "global_step": 5}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert detect_format(tmp_path / "old.ckpt") == "pickle"
    _assert_bit_exact(read_state_dict(tmp_path / "old.ckpt"), want)


def _fake_lightning(monkeypatch) -> tuple[type, type]:
    """Stand-ins for Lightning classes, importable under their real module path (for pickling)."""

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "epoch=3.ckpt"

    class AttributeDict(dict):
        pass

    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for cls in (ModelCheckpoint, AttributeDict):
        cls.__module__, cls.__qualname__ = names[-1], cls.__name__
        setattr(sys.modules[names[-1]], cls.__name__, cls)
    return ModelCheckpoint, AttributeDict


@pytest.mark.parametrize("zip_format", [True, False])
def test_lightning_bookkeeping_is_inert(tmp_path, monkeypatch, zip_format):
    """A real SD .ckpt holds callback state keyed by a Lightning class, numpy scalars, bytes."""
    checkpoint_cls, attr_dict = _fake_lightning(monkeypatch)
    hparams = attr_dict(lr=1e-4, betas=[0.9, 0.999])
    ckpt = {
        "state_dict": {"w": torch.ones(2)},
        "callbacks": {checkpoint_cls: {"best_model_score": torch.tensor(0.5), "obj": checkpoint_cls()}},
        "hyper_parameters": hparams,
        "hparams": argparse.Namespace(steps=10),
        "numpy": numpy.float64(0.25),
        "raw": b"\x00\xff",
        "ids": {1, 2},
        "global_step": 5,
    }
    torch.save(ckpt, tmp_path / "sd.ckpt", _use_new_zipfile_serialization=zip_format)
    got = read_state_dict(tmp_path / "sd.ckpt")
    assert list(got) == ["w"] and torch.equal(got["w"], torch.ones(2))


# --- format from bytes ---------------------------------------------------------------------------
def test_format_is_decided_from_bytes_not_name(tmp_path):
    want = _tensors()
    st_named_ckpt = tmp_path / "weights.ckpt"
    write_safetensors(want, st_named_ckpt)
    zip_named_st = tmp_path / "weights.safetensors"
    torch.save(want, zip_named_st)
    assert detect_format(st_named_ckpt) == "safetensors"
    assert detect_format(zip_named_st) == "torch-zip"
    _assert_bit_exact(read_state_dict(st_named_ckpt), want)
    _assert_bit_exact(read_state_dict(zip_named_st), want)


# --- bad files -------------------------------------------------------------------------------------
def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"e\.safetensors: empty file"):
        read_state_dict(tmp_path / "e.safetensors")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "v1-5.safetensors"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1\nsize 4265146304\n"
    )
    with pytest.raises(CheckpointError, match=r"Git LFS pointer.*git lfs pull"):
        read_state_dict(path)


def test_unknown_format_shows_first_bytes(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GIF89a not weights at all")
    with pytest.raises(CheckpointError, match=r"unrecognised format.*GIF89a"):
        read_state_dict(tmp_path / "x.bin")
    (tmp_path / "h.bin").write_bytes(b"<!DOCTYPE html><html>Sign in</html>")
    with pytest.raises(CheckpointError, match="HTML page"):
        detect_format(tmp_path / "h.bin")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors({"a": torch.ones(8), "b": torch.ones(4)}, path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '\w' ends at byte 48 .* only 43 bytes"):
        read_state_dict(path)


def test_header_length_bigger_than_file(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b'{"a": 1}')
    with pytest.raises(CheckpointError, match=r"header length 5000 bytes is larger than the file \(16 bytes\)"):
        read_state_dict(path)
    path.write_bytes(struct.pack("<Q", 3_000_000_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"header length 3000000000 bytes is absurd.*10 bytes"):
        read_state_dict(path)


def test_overlapping_offsets(tmp_path):
    path = tmp_path / "o.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path.write_bytes(_raw_safetensors(header, bytes(12)))
    with pytest.raises(CheckpointError, match=r"tensors 'a' and 'b' have overlapping data_offsets"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}, r"tensor 'a' has unknown dtype 'F13'"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"tensor 'a'.*span 8 bytes but shape \[3\]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"tensor 'a' has invalid data_offsets"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, r"tensor 'a' has invalid shape"),
    ],
)
def test_bad_header_entries(tmp_path, entry, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw_safetensors({"a": entry}, bytes(8)))
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_invalid_json_header(tmp_path):
    path = tmp_path / "j.safetensors"
    raw = b'{"a": [1, 2'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_state_dict(path)


def test_torch_zip_with_missing_storage(tmp_path):
    torch.save({"a": torch.ones(3)}, tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as src, zipfile.ZipFile(tmp_path / "b.pt", "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
    with pytest.raises(CheckpointError, match=r"b\.pt: storage entry 'a/data/0' is missing"):
        read_state_dict(tmp_path / "b.pt")


# Hand-written protocol-2 opcodes for pickles that torch.save never writes.
def _g(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:  # BINUNICODE
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _storage_pid(storage_type: bytes, numel: int) -> bytes:  # ("storage", type, "0", "cpu", numel)
    return b"(" + _s("storage") + storage_type + _s("0") + _s("cpu") + b"K" + bytes([numel]) + b"tQ"


def _rebuild(pid: bytes, offset: int, size: int) -> bytes:  # _rebuild_tensor_v2(pid, offset, (size,), (1,), False, ())
    args = pid + b"K" + bytes([offset]) + b"K" + bytes([size]) + b"\x85K\x01\x85\x89)"
    return _g("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


_FLOAT = _g("torch", "FloatStorage")


@pytest.mark.parametrize(
    ("pkl", "message"),
    [
        (
            _rebuild(_storage_pid(_FLOAT, 2), 0, 100),
            r"size \[100\].*reaches element 99 of storage '0'.*only 2",
        ),
        (_rebuild(_storage_pid(_FLOAT, 2), 1, 2), r"offset 1 reaches element 2 of storage '0'"),
        (_rebuild(_storage_pid(_FLOAT, 200), 0, 2), r"storage entry 'x/data/0' holds 8 bytes.*expects 800"),
        (_rebuild(_storage_pid(_g("torch", "device"), 2), 0, 2), r"names <torch.device>, not a storage type"),
        (_s("abc") + b"Q", r"unexpected persistent id 'abc'"),
        (_g("torch._utils", "_rebuild_tensor_v2") + b"N}" + _s("a") + b"K\x01s\x86b", r"modify the global"),
        (_g("copy_reg", "_reconstructor"), r"forbidden global 'copy_reg._reconstructor'"),
    ],
)
def test_hostile_torch_zip(tmp_path, pkl, message):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data.pkl", b"\x80\x02}" + _s("w") + pkl + b"s.")
        z.writestr("x/data/0", bytes(8))
    with pytest.raises(CheckpointError, match=r"x\.pt: .*" + message):
        read_state_dict(path)


def test_gpu_saved_storage_type_reads_on_cpu(tmp_path):
    """Older GPU checkpoints name torch.cuda.HalfStorage; the bytes are read to the CPU."""
    path = tmp_path / "gpu.ckpt"
    want = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float16)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "gpu/data.pkl",
            b"\x80\x02}" + _s("w") + _rebuild(_storage_pid(_g("torch.cuda", "HalfStorage"), 4), 0, 4) + b"s.",
        )
        z.writestr("gpu/data/0", want.numpy().tobytes())
    got = read_state_dict(path)
    assert got["w"].dtype == torch.float16 and torch.equal(got["w"], want)


# --- malicious pickles -----------------------------------------------------------------------------
class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(("payload", "name"), [(_System, r"(posix|os|nt)\.system"), (_Exec, r"builtins\.exec")])
@pytest.mark.parametrize("container", ["raw-pickle", "torch-zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, name, container):
    marker = tmp_path / "marker"
    obj = {"state_dict": {"w": torch.ones(2)}, "evil": payload(marker)}
    path = tmp_path / "evil.ckpt"
    if container == "raw-pickle":
        path.write_bytes(pickle.dumps(payload(marker), protocol=4))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=(container == "torch-zip"))
    with pytest.raises(CheckpointError, match=rf"evil\.ckpt: .*forbidden global '{name}'"):
        read_state_dict(path)
    assert not marker.exists()


def test_plain_pickle_is_not_a_checkpoint(tmp_path):
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="not a torch.save checkpoint"):
        read_state_dict(tmp_path / "p.pkl")


def test_whole_module_pickle_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"forbidden global 'torch\.nn\.modules\.linear\.Linear'"):
        read_state_dict(tmp_path / "m.pt")


# --- atomic writes ---------------------------------------------------------------------------------
def test_write_failure_leaves_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(TypeError, match=r"value for 'b' is a int"):
        write_safetensors({"a": torch.ones(2), "b": 3}, path)  # type: ignore[dict-item]
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    write_safetensors({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(wio.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors({"a": torch.zeros(100)}, path)
    with pytest.raises(OSError, match="disk full"):
        wio.atomic_write_bytes(tmp_path / "c.json", b"{}")
    assert _leftovers(tmp_path) == ["out.safetensors"]
    assert path.read_bytes() == before


def test_atomic_write_text(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, '{"x": "é"}')
    atomic_write_text(path, '{"x": 2}')
    assert path.read_text(encoding="utf-8") == '{"x": 2}'
    assert _leftovers(tmp_path) == ["config.json"]
