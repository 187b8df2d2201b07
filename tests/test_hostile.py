"""Hostile files, each built here, small: what a stranger's checkpoint, config, spec or PNG can make
us do. Every one must end in the one bad-file error (``BadFileError``, a ``ValueError``) naming the
file, never in a traceback, a hang or gigabytes of memory. docs/reliability.md lists them all.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stablediff import cli
from stablediff.errors import BadFileError, load_json, printable
from stablediff.limits import LIMITS, config_from_dict
from stablediff.loading import SPEC_METADATA_KEY, TOKENIZER_METADATA_KEY, load_pipeline, save
from stablediff.models.clip import CLIPTextConfig
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig
from stablediff.params import GenerationParams
from stablediff.presets import PRESETS, ModelSpec, infer_spec
from stablediff.weights.io import CheckpointError, read_state_dict, write_safetensors
from stablediff.weights.strict import WeightMismatchError

PEAK_LIMIT_MB = 300  # a child that imports torch starts near 230 MB


# --- pickle and zip written by hand --------------------------------------------------------------
def _g(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:  # BINUNICODE
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _i(value: int) -> bytes:  # BININT (4 bytes) or LONG1 for larger
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _storage(storage_type: str, key: str, numel: int) -> bytes:  # persistent id ("storage", T, key, "cpu", n)
    return _tuple(_s("storage"), _g("torch", storage_type), _s(key), _s("cpu"), _i(numel)) + b"Q"


def _tensor(storage: bytes, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    """_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    hooks = _g("collections", "OrderedDict") + b")R"
    args = _tuple(storage, _i(offset), _tuple(*map(_i, size)), _tuple(*map(_i, stride)), b"\x89", hooks)
    return _g("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _device_tensor(tensor: bytes, dtype: str) -> bytes:
    """_rebuild_device_tensor_from_cpu_tensor(tensor, torch.<dtype>, "cpu", False)."""
    args = _tuple(tensor, _g("torch", dtype), _s("cpu"), b"\x89")
    return _g("torch._utils", "_rebuild_device_tensor_from_cpu_tensor") + args + b"R"


def _state_pickle(items: dict[str, bytes]) -> bytes:
    body = b"".join(_s(k) + v for k, v in items.items())
    return b"\x80\x02}(" + body + b"u."


def _torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data.pkl", pkl)
        for key, data in storages.items():
            z.writestr(f"x/data/{key}", data)
    return path


def stride0_bomb(path: Path) -> Path:
    """A few hundred bytes: one float32 element viewed 300 million times (stride 0), "rebuilt on a
    device" as float64, which torch's loader (and ours, before) materialises: 2.4 GB."""
    view = _tensor(_storage("FloatStorage", "0", 1), (300_000_000,), (0,))
    return _torch_zip(path, _state_pickle({"w": _device_tensor(view, "float64")}), {"0": bytes(4)})


def _local_header(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, csize, usize, len(name), 0) + name


def _central_header(name: bytes, method: int, crc: int, csize: int, usize: int, offset: int) -> bytes:
    fields = (b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, csize, usize, len(name), 0, 0, 0, 0, 0, offset)
    return struct.pack("<4sHHHHHHIIIHHHHHII", *fields) + name


def _quote(data: bytes) -> bytes:
    """A deflate stored-block header for ``data``: the decompressor copies the next bytes as they are."""
    return b"\x00" + struct.pack("<HH", len(data), len(data) ^ 0xFFFF)


def overlap_bomb(path: Path, entries: int = 20, kernel_mb: int = 40) -> Path:
    """About 44 KB: ``entries`` storages whose deflate streams all end in the same compressed block
    of ``kernel_mb`` MB of zeros (each entry's data quotes the next entries' local headers as stored
    blocks, D. Fifield's overlapping zip bomb). Every entry is a valid storage with a correct CRC,
    so a loader that reads each entry reads the kernel ``entries`` times: 800 MB by default."""
    zeros = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    kernel = b"".join(packer.compress(zeros) for _ in range(kernel_mb)) + packer.flush()
    kernel_size = kernel_mb << 20
    names = [f"x/data/{i}".encode() for i in range(entries)]
    # Entry i's data: [quote of header i+1][header i+1][quote of header i+2] ... [kernel], so it
    # decompresses to header i+1 + ... + header N-1 + the kernel's zeros. Built from the last entry.
    headers: list[bytes] = [b""] * entries
    usizes, csizes, crcs = [0] * entries, [0] * entries, [0] * entries
    plain, compressed = b"", kernel  # entry i+1: its output before the zeros, and its compressed bytes
    for i in reversed(range(entries)):
        if i < entries - 1:
            quoted = headers[i + 1]
            plain = quoted + plain
            compressed = _quote(quoted) + quoted + compressed
        usizes[i], csizes[i] = len(plain) + kernel_size, len(compressed)
        crc = zlib.crc32(plain)
        for _ in range(kernel_mb):
            crc = zlib.crc32(zeros, crc)
        crcs[i] = crc
        headers[i] = _local_header(names[i], 8, crcs[i], csizes[i], usizes[i])
    body = bytearray()
    offsets = []
    for i in range(entries):
        offsets.append(len(body))
        body += headers[i] + (_quote(headers[i + 1]) if i < entries - 1 else b"")
    body += kernel
    tensors = {f"t{i}": _tensor(_storage("ByteStorage", str(i), n), (n,), (1,)) for i, n in enumerate(usizes)}
    pkl = _state_pickle(tensors)
    pkl_name = b"x/data.pkl"
    pkl_offset = len(body)
    pkl_crc = zlib.crc32(pkl)
    body += _local_header(pkl_name, 0, pkl_crc, len(pkl), len(pkl)) + pkl
    central = b"".join(
        _central_header(names[i], 8, crcs[i], csizes[i], usizes[i], offsets[i]) for i in range(entries)
    ) + _central_header(pkl_name, 0, pkl_crc, len(pkl), len(pkl), pkl_offset)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, entries + 1, entries + 1, len(central), len(body), 0)
    path.write_bytes(bytes(body) + central + end)
    return path


def _peak_of_loading(path: Path) -> tuple[float, str]:
    """Load ``path`` in a child process; return its peak resident memory (MB) and its one-line result."""
    code = textwrap.dedent(
        """
        import resource, sys
        from stablediff.weights.io import read_state_dict
        try:
            read_state_dict(sys.argv[1])
            result = "loaded"
        except ValueError as err:
            result = f"{type(err).__name__}: {err}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        try:
            with open("/proc/self/status") as f:
                peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        except OSError:
            pass
        print(f"{peak:.1f}")
        print(result)
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    peak, result = done.stdout.split("\n", 1)
    return float(peak), result.strip()


# --- memory bombs through the restricted unpickler ----------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (stride0_bomb, r"size \[300000000\] and stride \[0\] would hold 1200000000 bytes.*only 4: a stride-0"),
        (overlap_bomb, r"zip entries 'x/data/0' and 'x/data/1' overlap"),
    ],
    ids=["stride0", "overlapping-zip"],
)
def test_memory_bombs_are_refused_in_little_memory(tmp_path, build, message):
    """A 443-byte checkpoint used to take 2.5 GB, a 45 KB one 1 GB (both measured with the old
    unpickler); now each is refused before it allocates, and the error names the file."""
    path = build(tmp_path / "bomb.ckpt")
    assert path.stat().st_size < (500 if build is stride0_bomb else 50_000)
    peak, result = _peak_of_loading(path)
    print(f"{build.__name__}: {path.stat().st_size} bytes, child peak {peak:.0f} MB")
    assert result.startswith("CheckpointError: " + str(path) + ": ")
    assert __import__("re").search(message, result), result
    assert peak < PEAK_LIMIT_MB, f"loading {path.name} peaked at {peak:.0f} MB"


def test_overlap_bomb_is_a_real_bomb(tmp_path):
    """The bomb is honest: its entries are valid deflate streams with correct CRCs that all expand
    through the same 40 MB kernel (read here one entry at a time, without the loader)."""
    path = overlap_bomb(tmp_path / "bomb.ckpt", entries=3, kernel_mb=4)
    with zipfile.ZipFile(path) as z:
        sizes = []
        for name in ("x/data/0", "x/data/1", "x/data/2"):
            with z.open(name) as f:  # reading to the end checks the CRC
                sizes.append(sum(len(chunk) for chunk in iter(lambda f=f: f.read(1 << 20), b"")))
    assert min(sizes) >= 4 << 20 and path.stat().st_size < 10_000


def test_device_tensor_conversion_and_repeated_views_are_refused(tmp_path):
    view = _tensor(_storage("FloatStorage", "0", 4), (4,), (1,))
    path = _torch_zip(tmp_path / "dev.pt", _state_pickle({"w": _device_tensor(view, "float64")}), {"0": bytes(16)})
    with pytest.raises(CheckpointError, match=r"dev\.pt: device tensor of dtype torch.float64 rebuilt from data"):
        read_state_dict(path)
    # The same dtype is what torch writes: the view is returned as it is.
    path = _torch_zip(tmp_path / "same.pt", _state_pickle({"w": _device_tensor(view, "float32")}), {"0": bytes(16)})
    assert read_state_dict(path)["w"].shape == (4,)
    # 3,000 full views of one 4 KB storage would be 12 MB once copied: over the budget.
    storage = _storage("FloatStorage", "0", 1024)
    pkl = _state_pickle({f"w{i}": _tensor(storage, (1024,), (1,)) for i in range(3000)})
    path = _torch_zip(tmp_path / "views.pt", pkl, {"0": bytes(4096)})
    with pytest.raises(CheckpointError, match=r"views\.pt: the tensors would hold .* bytes, more than the 4096 bytes"):
        read_state_dict(path)
    # Tied weights (a few views of one storage) load.
    pkl = _state_pickle({f"w{i}": _tensor(storage, (1024,), (1,)) for i in range(3)})
    assert len(read_state_dict(_torch_zip(tmp_path / "tied.pt", pkl, {"0": bytes(4096)}))) == 3


def test_expanded_tensor_saved_by_torch_is_refused(tmp_path):
    """torch.save keeps an expanded tensor as a stride-0 view: one element standing for a million."""
    for legacy in (False, True):
        path = tmp_path / f"expanded-{legacy}.pt"
        torch.save({"w": torch.zeros(1).expand(1_000_000)}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=r"would hold 4000000 bytes but its storage .* has only 4"):
            read_state_dict(path)


def test_oversized_pickle_and_byteorder_entries_are_refused(tmp_path):
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x/data.pkl", b"\x80\x02" + bytes(65 << 20))  # 65 MiB of zeros, 65 KB on disk
    with pytest.raises(CheckpointError, match=r"big\.pt: data\.pkl is 68157442 bytes"):
        read_state_dict(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x/data.pkl", _state_pickle({}))
        z.writestr("x/byteorder", bytes(1 << 20))
    with pytest.raises(CheckpointError, match=r"byteorder entry is not 'little' or 'big'"):
        read_state_dict(path)


# --- sizes from a file ----------------------------------------------------------------------------
_CONFIGS = {"UNetConfig": UNetConfig, "VAEConfig": VAEConfig, "CLIPTextConfig": CLIPTextConfig}


def _limit_cases():
    for kind, table in LIMITS.items():
        if kind not in _CONFIGS:
            continue
        for name, bound in table.items():
            if name == "channels":
                continue
            yield pytest.param(kind, name, bound, id=f"{kind}.{name}")


@pytest.mark.parametrize(("kind", "name", "bound"), list(_limit_cases()))
def test_every_limit_is_enforced_with_the_field_named(kind, name, bound):
    cls = _CONFIGS[kind]
    base = cls().to_dict()
    too_big = int(bound.hi) + 1 if isinstance(bound.hi, int) else bound.hi * 2
    too_small = int(bound.lo) - 1 if isinstance(bound.lo, int) else bound.lo / 2
    if bound.max_len:
        cases = [[1] * (bound.max_len + 1), [too_big]]
        if bound.min_len:
            cases.append([])
    else:
        cases = [too_big, too_small]
    for value in cases:
        with pytest.raises(BadFileError, match=rf"^the file: {name}"):
            cls.from_dict({**base, name: value}, "the file")


def test_derived_channel_limits():
    with pytest.raises(BadFileError, match=r"channels = 16384 is larger than any real model has"):
        UNetConfig.from_dict({"model_channels": 4096, "channel_mult": [1, 4], "attention_levels": []}, "f")
    with pytest.raises(BadFileError, match=r"channels = 16384 is larger"):
        VAEConfig.from_dict({"ch": 4096, "ch_mult": [1, 4]}, "f")


def test_real_models_are_within_the_limits():
    """SD 1.x, 2.x (the presets) and SDXL's networks pass; the limits refuse only what no model has."""
    from stablediff.weights import convert

    for spec in PRESETS.values():
        assert ModelSpec.from_json(spec.to_json()) == spec
    sdxl_unet = {
        "model_channels": 320,
        "channel_mult": [1, 2, 4],
        "attention_levels": [1, 2],
        "num_heads": None,
        "head_dim": 64,
        "transformer_depth": 10,
        "context_dim": 2048,
        "use_linear_proj": True,
    }
    UNetConfig.from_dict(sdxl_unet)
    VAEConfig.from_dict({"scaling_factor": 0.13025})
    bigg = {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
    }
    config_from_dict(CLIPTextConfig, convert.text_config_from_transformers(bigg), "bigG")
    sd2_unet = {
        "block_out_channels": [320, 640, 1280, 1280],
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
        "sample_size": 96,
    }
    assert config_from_dict(UNetConfig, convert.unet_config_from_diffusers(sd2_unet), "sd2") == PRESETS["sd2"].unet


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return save(load_pipeline("tiny"), tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


def _rewrite(source: Path, target: Path, tensors: dict | None = None, **metadata: str | None) -> Path:
    """A copy of ``source`` with ``tensors`` changed and metadata keys set (None: removed). The
    spec's checksum is dropped, as in files written before it, so the spec itself is what is tested."""
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata() or {})
    meta = {k: v for k, v in meta.items() if "sha256" not in k}
    for key, value in metadata.items():
        key = {"spec": SPEC_METADATA_KEY, "tokenizer": TOKENIZER_METADATA_KEY}.get(key, key)
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    sd = load_file(source) if tensors is None else tensors
    save_file(sd, target, metadata=meta)
    return target


_DROP = object()


def _spec_with(**changes) -> str:
    """The tiny preset's spec JSON with ``changes`` ("unet.num_res_blocks": value; _DROP: removed)."""
    data = json.loads(PRESETS["tiny"].to_json())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        if value is _DROP:
            node.pop(last)
        else:
            node[last] = value
    return json.dumps(data)


def test_spec_asking_for_a_billion_res_blocks_fails_at_once(tiny_file, tmp_path):
    """It used to run 253 s and take 7.3 GB before failing."""
    import time

    path = _rewrite(tiny_file, tmp_path / "blocks.safetensors", spec=_spec_with(**{"unet.num_res_blocks": 10**9}))
    start = time.perf_counter()
    with pytest.raises(BadFileError, match=rf"{path}: .*unet: num_res_blocks = 1000000000 is larger than any real"):
        load_pipeline(path)
    assert time.perf_counter() - start < 10


def test_diffusers_config_with_200000_layers_fails_at_once(tmp_path):
    import time

    folder = save(load_pipeline("tiny"), tmp_path / "d", layout="diffusers")
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 200_000}))
    start = time.perf_counter()
    with pytest.raises(BadFileError, match=rf"{config_path}: layers \(from num_hidden_layers\) = 200000 is larger"):
        load_pipeline(folder)
    assert time.perf_counter() - start < 10
    for key, value, message in [
        ("hidden_size", "768", r"hidden_size must be an integer >= 1, got '768'"),
        ("intermediate_size", 100, r"intermediate_size 100 is not a multiple of hidden_size 32"),
        ("layer_norm_eps", [1], r"layer_norm_eps must be a number"),
    ]:
        config_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(BadFileError, match=rf"{config_path}: {message}"):
            load_pipeline(folder)
    config_path.write_text("[" * 100_000)
    with pytest.raises(BadFileError, match=rf"{config_path} is JSON nested too deeply"):
        load_pipeline(folder)
    config_path.write_text(json.dumps(config))
    # The U-Net's weights without our spec: the folder is a foreign one, its configs are all there is.
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, tmp_path / "plain.safetensors", spec=None).replace(weights)
    unet_config = folder / "unet" / "config.json"
    unet = json.loads(unet_config.read_text())
    for key, value, message in [
        ("block_out_channels", [0, 32], r"block_out_channels must be a non-empty list of integers >= 1"),
        ("down_block_types", [1, 2], r"down_block_types must be a list of strings"),
        ("layers_per_block", 100, r"num_res_blocks \(from layers_per_block\) = 100 is larger"),
        ("sample_size", 10**6, r"default_size \(from sample_size\) = 2000000 is larger"),
        ("sample_size", "64", r"sample_size must be an integer"),
    ]:
        unet_config.write_text(json.dumps({**unet, key: value}))
        with pytest.raises(BadFileError, match=rf"{unet_config}: {message}"):
            load_pipeline(folder)


def test_infer_spec_with_too_few_tensors_names_the_missing_key(tmp_path):
    """A file with one or two U-Net tensors used to end in StopIteration or KeyError."""
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    with pytest.raises(ValueError, match=r"no cross-attention weights"):
        infer_spec(sd)
    sd["model.diffusion_model.input_blocks.1.0.out_layers.3.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(ValueError, match=r"no cross-attention weights"):
        infer_spec(sd)
    for tensors in (
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
        {"first_stage_model.encoder.conv_in.weight": torch.zeros(8)},
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(0, 4, 3, 3)},
    ):
        path = tmp_path / "few.safetensors"
        save_file(tensors, path)
        with pytest.raises(BadFileError, match=rf"^{path}: "):
            load_pipeline(path)


def test_many_numbered_blocks_are_refused_quickly():
    """Counting blocks is one pass over the keys, and more blocks than any model has is an error."""
    import time

    sd = {f"input_blocks.{i}.0.weight": torch.zeros(1) for i in range(50_000)}
    sd["input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    from stablediff.presets import infer_unet_config

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"50000 numbered blocks 'input_blocks.N.': more than any real model"):
        infer_unet_config(sd)
    assert time.perf_counter() - start < 5


# --- every malformed input ends in the one bad-file error -----------------------------------------
def test_deeply_nested_json_everywhere(tiny_file, tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    with pytest.raises(BadFileError, match=r"nested too deeply"):
        load_json(deep, "x")
    with pytest.raises(BadFileError, match=r"nested too deeply \(more than 64"):
        load_json("[" * 70 + "]" * 70, "x")
    raw = b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    header = tmp_path / "deep.safetensors"
    header.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=rf"{header}: safetensors header is JSON nested too deeply"):
        read_state_dict(header)
    path = _rewrite(tiny_file, tmp_path / "spec.safetensors", spec=deep)
    with pytest.raises(BadFileError, match=rf"{path}: .*nested too deeply"):
        load_pipeline(path)
    png = _png(tmp_path / "deep.png", stablediff=deep)
    with pytest.raises(BadFileError, match=rf"{png}: the stablediff chunk is JSON nested too deeply"):
        __import__("stablediff.image", fromlist=["x"]).read_png_metadata(png)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{}", r"the 'unet' config is missing"),
        ("[]", r"expected a JSON object, got list"),
        ("null", r"expected a JSON object, got NoneType"),
        (_spec_with(unet="x"), r"unet: expected a JSON object, got str"),
        (_spec_with(**{"unet.channel_mult": 5}), r"unet: channel_mult must be a list of integers, got 5"),
        (_spec_with(**{"unet.num_res_blocks": 2.0}), r"unet: num_res_blocks must be an integer, got 2.0"),
        (_spec_with(**{"unet.num_res_blocks": True}), r"unet: num_res_blocks must be an integer, got True"),
        (_spec_with(**{"unet.bogus": 1}), r"unet: unknown field 'bogus'"),
        (_spec_with(**{"vae.scaling_factor": "0.18"}), r"vae: scaling_factor must be a finite number"),
        (_spec_with(**{"text.activation": 3}), r"text: activation must be a string"),
        (_spec_with(**{"text.activation": "relu"}), r"text: activation 'relu' not in"),
        (_spec_with(prediction_type=["v"]), r"prediction_type must be a string"),
        (_spec_with(name=_DROP), r"the field name is missing"),
        (_spec_with(**{"schedule.num_train_timesteps": 10**12}), r"schedule: num_train_timesteps = 1000000000000"),
        (_spec_with(**{"schedule.beta_start": float("nan")}), r"is not valid JSON: NaN is not a JSON number"),
        (_spec_with(default_size=10**6), r"default_size = 1000000 is larger"),
        (_spec_with(**{"unet.head_dim": 128, "unet.num_heads": None}), r"cannot be split into 0 attention heads"),
    ],
)
def test_spec_metadata_of_the_wrong_shape(tiny_file, tmp_path, spec, message):
    """KeyError, TypeError and AttributeError used to escape; now a BadFileError names the file and field."""
    path = _rewrite(tiny_file, tmp_path / "spec.safetensors", spec=spec)
    with pytest.raises(BadFileError, match=rf"^{path}: .*{message}"):
        load_pipeline(path)


@pytest.mark.parametrize(
    "tokenizer",
    ["[]", '{"vocab": 5}', '{"vocab": {}, "merges": 3}', "{", '{"merges": []}'],
)
def test_tokenizer_metadata_of_the_wrong_shape(tiny_file, tmp_path, tokenizer):
    path = _rewrite(tiny_file, tmp_path / "tok.safetensors", tokenizer=tokenizer)
    with pytest.raises(BadFileError, match=rf"^{path}: metadata 'stablediff.tokenizer'"):
        load_pipeline(path)


def test_tokenizer_folder_of_the_wrong_shape(tmp_path):
    folder = save(load_pipeline("tiny"), tmp_path / "d", layout="diffusers")
    tok = folder / "tokenizer"
    for name, content in [
        ("vocab.json", "[" * 50_000),
        ("vocab.json", "[1, 2]"),
        ("vocab.json", '{"a": "b"}'),
        ("vocab.json", '{"a": 1}'),
        ("merges.txt", "a b c\n"),
        ("tokenizer_config.json", "[]"),
        ("tokenizer_config.json", '{"model_max_length": "77"}'),
    ]:
        original = (tok / name).read_bytes()
        (tok / name).write_text(content)
        with pytest.raises(BadFileError, match=rf"^{folder}"):
            load_pipeline(folder)
        (tok / name).write_bytes(original)


def test_integer_tensor_where_a_float_belongs(tiny_file, tmp_path):
    """It used to end in a RuntimeError from torch."""
    sd = load_file(tiny_file)
    key = "model.diffusion_model.out.2.weight"
    sd[key] = torch.zeros(sd[key].shape, dtype=torch.int32)
    path = _rewrite(tiny_file, tmp_path / "int.safetensors", tensors=sd)
    with pytest.raises(WeightMismatchError, match=rf"^{path}: unet: key 'out.2.weight' has dtype torch.int32"):
        load_pipeline(path)


# --- writing: a full disk -----------------------------------------------------------------------
def test_full_disk_while_writing_safetensors_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device") as caught:
        write_safetensors({"a": torch.zeros(2)}, target)
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_a_training_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from stablediff.train import checkpoint as ckpt
    from stablediff.train.config import TrainConfig

    config = TrainConfig(stage="vae", out=str(tmp_path))
    args = dict(ema=None, optimizer={}, rng={"cpu": torch.zeros(4, dtype=torch.uint8)}, state={}, config=config)
    first = ckpt.save_checkpoint(tmp_path, 1, model={"w": torch.ones(3)}, keep_last=2, **args)
    real = ckpt.write_safetensors

    def fill_the_disk(tensors, path, metadata=None):
        if Path(path).name == "model.safetensors":
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "write_safetensors", fill_the_disk)
    with pytest.raises(OSError, match=r"checkpoint of step 2 to .*step_0000002: No space left on device; the previous"):
        ckpt.save_checkpoint(tmp_path, 2, model={"w": torch.zeros(3)}, keep_last=2, **args)
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]
    assert torch.equal(read_state_dict(first / "model.safetensors")["w"], torch.ones(3))


# --- PNGs -------------------------------------------------------------------------------------------
def _png(path: Path, **chunks: str) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _record(**params) -> str:
    record = GenerationParams("a cat", width=64, height=64, steps=2, **params).to_record("tiny", "tiny", None)
    return json.dumps(record)


def test_png_records_of_the_wrong_shape(tmp_path, capsys):
    cases = [
        (json.dumps({"model": "tiny"}), r"the stablediff chunk has no 'params' object"),
        ("[1, 2]", r"the stablediff chunk is a JSON list, not an object"),
        ("{", r"the stablediff chunk is not valid JSON"),
        (json.dumps({"params": {"prompt": "a", "steps": "20"}}), r"stored parameters are invalid: steps must be an"),
        (json.dumps({"params": {"prompt": "a", "width": 10**6}}), r"width must be at most 8192"),
        (json.dumps({"params": {"steps": 3}}), r"GenerationParams JSON needs a 'prompt'"),
        (json.dumps({"params": {"prompt": "a", "bogus": 1}}), r"unknown GenerationParams keys \['bogus'\]"),
        (json.dumps({"params": {"prompt": "a"}, "model_file": 5}), r"'model_file' must be a string"),
    ]
    for i, (chunk, message) in enumerate(cases):
        png = _png(tmp_path / f"{i}.png", stablediff=chunk)
        code = cli.main(["generate", "--from", str(png), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert __import__("re").search(rf"^stablediff generate: error: {png}: .*{message}", err), err


def test_info_escapes_control_characters(tmp_path, capsys):
    evil = "a cat\x1b[2J\x1b]0;owned\x07 \x9b31m \u202eevil\nSteps: 20, Sampler: Euler, Seed: 1"
    png = _png(tmp_path / "evil.png", parameters=evil, stablediff=_record(negative_prompt="\x1b[5m\u2066x"))
    assert cli.main(["info", str(png)]) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\x9b\u202e\u2066")
    assert "a cat\\x1b[2J\\x1b]0;owned\\x07 \\x9b31m \\u202eevil\nSteps: 20" in out
    assert printable("tab\tand\nnewline\x00") == "tab\tand\nnewline\\x00"


def test_error_messages_escape_control_characters(tmp_path, capsys):
    bad = tmp_path / "bad\x1b[31m.safetensors"
    bad.write_bytes(b"\x1b[2Jgarbage")
    assert cli.main(["generate", "a", "--model", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "bad\\x1b[31m.safetensors" in err


def test_png_metadata_never_holds_a_folder_of_this_machine(tiny_file, tmp_path, capsys, monkeypatch):
    init = tmp_path / "pictures" / "holiday.png"
    init.parent.mkdir()
    Image.new("RGB", (64, 64), "red").save(init)
    out = tmp_path / "out"
    argv = ["img2img", "a cat", "--init", str(init), "--model", str(tiny_file), "--steps", "2", "--out", str(out)]
    assert cli.main([*argv, "--strength", "0.5"]) == 0
    png = Path(capsys.readouterr().out.strip())
    raw = png.read_bytes()
    for folder in {str(tmp_path), str(tiny_file.parent), str(Path.home()), os.getcwd()} - {"/"}:
        assert folder.encode() not in raw, folder  # the text chunks are stored uncompressed
    record = __import__("stablediff.image", fromlist=["x"]).read_png_metadata(png)["stablediff"]
    assert record["params"]["init_image"] == "holiday.png" and record["model_file"] == "tiny.safetensors"
    assert "model_path" not in record

    # --from says which files it takes; they must be there, as written or in the current folder.
    monkeypatch.chdir(tmp_path)
    code = cli.main(["generate", "--from", str(png), "--out", str(out)])
    assert code == 2
    assert "names the init_image file 'holiday.png', which is neither there nor in the current folder; pass --init" in (
        capsys.readouterr().err
    )
    monkeypatch.chdir(init.parent)
    code = cli.main(["generate", "--from", str(png), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "names the model file 'tiny.safetensors'" in err and "pass --model" in err
    assert "using the init_image file 'holiday.png' named in the PNG" in err
    code = cli.main(["generate", "--from", str(png), "--model", str(tiny_file), "--out", str(out)])
    assert code == 0, capsys.readouterr().err


def test_old_pngs_with_absolute_paths_still_read(tmp_path):
    record = json.loads(_record())
    record.pop("model_file")
    record["model_path"] = "/home/someone/models/v1-5.safetensors"
    params, model = GenerationParams.from_record(record, "old.png")
    assert params.prompt == "a cat" and model["model_file"] == "/home/someone/models/v1-5.safetensors"
    assert cli._file_from_png("old.png", "model", "tiny", "--model") == "tiny"
    local = tmp_path / "v1-5.safetensors"
    local.write_bytes(b"")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert cli._file_from_png("old.png", "model", model["model_file"], "--model") == "v1-5.safetensors"
    finally:
        os.chdir(old)


# --- generation limits and messages ---------------------------------------------------------------
@pytest.mark.parametrize(("field", "most"), [("width", 8192), ("height", 8192), ("batch_size", 64), ("steps", 1000)])
def test_generation_upper_bounds(field, most):
    assert LIMITS["GenerationParams"][field].hi == most
    with pytest.raises(ValueError, match=rf"^{field} must be at most {most}, got {most + 8}"):
        GenerationParams("a cat", **{field: most + 8}).validate()
    GenerationParams("a cat", **{field: most}).validate()


def test_non_finite_message_names_the_dtype(monkeypatch):
    pipe = load_pipeline("tiny")
    params = GenerationParams("a", width=64, height=64, steps=1)
    nan = torch.full((1, 4, 8, 8), float("nan"))
    monkeypatch.setattr(pipe, "sample_latents", lambda *a, **k: nan)
    with pytest.raises(ValueError, match=r"latents became non-finite .* U-Net in torch.float32"):
        pipe.generate(params)
    monkeypatch.setattr(pipe, "sample_latents", lambda *a, **k: torch.zeros(1, 4, 8, 8))
    monkeypatch.setattr(pipe, "decode", lambda latents: torch.full((1, 3, 64, 64), float("inf")))
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) with the VAE in torch.float32") as caught:
        pipe.generate(params)
    assert "float16" not in str(caught.value)
    pipe.vae.half()  # a float16 VAE's decode is redone in float32 (tests/test_precision_guard.py) first
    with pytest.raises(ValueError, match=r"with the VAE in torch.float16 and again in float32"):
        pipe.generate(params)
    assert pipe.last_fallback == ("decode",)


# --- the command line: one line for a bad file, a traceback for a bug ------------------------------
def test_command_line_prints_one_line_for_each_hostile_file(tiny_file, tmp_path, capsys):
    files = {
        "stride0": stride0_bomb(tmp_path / "stride0.ckpt"),
        "spec": _rewrite(tiny_file, tmp_path / "spec.safetensors", spec=_spec_with(**{"unet.num_res_blocks": 10**9})),
        "empty-spec": _rewrite(tiny_file, tmp_path / "empty.safetensors", spec="{}"),
        "two-tensors": tmp_path / "two.safetensors",
    }
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, files["two-tensors"])
    for path in files.values():
        code = cli.main(["generate", "a", "--model", str(path), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"stablediff generate: error: {path}: "), err


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise KeyError("a bug in our code")

    monkeypatch.setattr(cli, "load_pipeline", bug)
    with pytest.raises(KeyError, match="a bug in our code"):
        cli.main(["generate", "a", "--model", "tiny", "--out", str(tmp_path)])
