"""A seeded mutation fuzzer over what strangers' files feed us: safetensors headers, our model spec
metadata, and PNG parameter chunks (our JSON record and A1111's text).

Every case either loads, and then each number equals what an independent decoding of the same bytes
says (written here, without the code under test), or raises the one bad-file error
(``stablediff.errors.BadFileError``). Any other exception, a case over ``CASE_SECONDS`` and a
silently changed number fail the test, which names the case's seed so that it can be replayed:
``random.Random(f"{SEED}:{target}:{case}")`` rebuilds it. 8,020 cases, about 20 s on two CPU cores.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import struct
import time
import traceback
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from stablediff.diffusion.schedules import ScheduleConfig
from stablediff.errors import BadFileError
from stablediff.models.clip import CLIPTextConfig
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig
from stablediff.params import GenerationParams
from stablediff.presets import PRESETS, ModelSpec
from stablediff.weights.io import read_metadata, read_state_dict

SEED = 20_240_611
CASE_SECONDS = 10
CASES = {"safetensors": 3000, "spec": 3000, "spec-file": 20, "png-record": 1000, "a1111": 1000}
assert sum(CASES.values()) >= 2000


class Hang(BaseException):
    """A case ran past CASE_SECONDS (a BaseException: no ``except Exception`` in the code swallows it)."""


@contextmanager
def deadline(seconds: int):
    def expire(signum, frame):
        raise Hang(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cases(target: str, check) -> dict[str, int]:
    """Run ``check(rng, case)`` for each case of ``target``; it returns "loaded" or raises.

    BadFileError counts as "refused"; any other exception (or a Hang) is a failure, reported with
    its seed and traceback."""
    counts = {"loaded": 0, "refused": 0}
    failures = []
    for case in range(CASES[target]):
        rng = random.Random(f"{SEED}:{target}:{case}")
        try:
            with deadline(CASE_SECONDS):
                counts[check(rng, case)] += 1
        except BadFileError:
            counts["refused"] += 1
        except (Exception, Hang) as err:  # every other outcome is a finding
            failures.append(f"case {target}:{case}: {type(err).__name__}: {err}\n{traceback.format_exc(limit=-4)}")
    assert not failures, f"{len(failures)} of {CASES[target]} cases failed; the first:\n" + "\n".join(failures[:3])
    # Both outcomes must be common, or the mutations are not reaching the code.
    assert min(counts.values()) >= CASES[target] // 20, counts
    return counts


# --- random values and mutations ------------------------------------------------------------------
_POOL = [
    0,
    1,
    -1,
    2,
    3,
    8,
    64,
    77,
    10**9,
    2**31,
    2**63,
    2**64,
    10**30,
    -(2**63),
    0.5,
    1.0,
    2.0,
    -0.0,
    1e300,
    1e-300,
    True,
    False,
    None,
    "",
    "x",
    "0",
    "1",
    "gelu",
    "quick_gelu",
    "epsilon",
    "v_prediction",
    "openclip",
    "linear",
    "scaled_linear",
    "F32",
    "I64",
    [],
    [1],
    [1, 2],
    [0],
    [1, 2, 4, 4],
    [-1],
    [1.0, 2.0],
    [True],
    [[1]],
    ["1"],
    {},
    {"a": 1},
    {"prompt": "x"},
    "\x1b[2J\u202e",
    "é" * 3,
]  # one value of each JSON kind that matters


def random_value(rng: random.Random):
    roll = rng.random()
    if roll < 0.7:
        return copy.deepcopy(rng.choice(_POOL))
    if roll < 0.85:
        return rng.randint(-10, 300)
    if roll < 0.93:
        value: object = rng.randint(0, 3)
        for _ in range(rng.choice((1, 2, 63, 64, 65, 200))):  # deeper: mutate_text's brackets
            value = [value]
        return value
    return "".join(rng.choice('ab,:"\\\n{}[]0-') for _ in range(rng.randint(0, 30)))


def _containers(tree, path=()):
    yield path, tree
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _containers(value, (*path, key))


def mutate_tree(rng: random.Random, tree, names: list[str]):
    """One structural change somewhere in a JSON tree: a value replaced, a key removed, added or
    renamed, or a node wrapped in a list. ``names`` are field names worth adding."""
    tree = copy.deepcopy(tree)
    path, node = rng.choice(list(_containers(tree)))
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    op = rng.random()
    if not keys or op < 0.1:
        key = rng.choice(names) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[key] = random_value(rng)
        else:
            node.append(random_value(rng))
        return tree
    key = rng.choice(keys)
    if op < 0.7:
        node[key] = random_value(rng)
    elif op < 0.82:
        del node[key]
    elif op < 0.92 and isinstance(node, dict):
        node[rng.choice(names) + rng.choice(("", "_", "X"))] = node.pop(key)
    else:
        node[key] = [node[key]]
    return tree


_TEXT_BITS = ["{", "}", "[", "]", '"', ",", ":", "\\", "0", "-", "e", "9" * 30, "NaN", "Infinity", "\x00", "\x1b", " "]


def mutate_text(rng: random.Random, text: str) -> str:
    """One change to raw text: a character replaced or deleted, a piece inserted, a cut, a duplicate."""
    if not text:
        return rng.choice(_TEXT_BITS)
    i = rng.randrange(len(text))
    op = rng.random()
    if op < 0.3:
        return text[:i] + rng.choice(_TEXT_BITS) + text[i + 1 :]
    if op < 0.5:
        return text[:i] + text[i + rng.randint(1, 8) :]
    if op < 0.75:
        return text[:i] + rng.choice(_TEXT_BITS) + text[i:]
    if op < 0.82:
        return text[:i]
    if op < 0.85:  # nesting deeper than any parser recursion limit
        return text[:i] + "[" * 5000 + "0" + "]" * 5000 + text[i:]
    j = min(len(text), i + rng.randint(1, 40))
    return text[:j] + text[i:j] + text[j:]


# --- safetensors ---------------------------------------------------------------------------------
# The format's dtype names, decoded here independently of stablediff.weights.io.
ST_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def _base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 4),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(6, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }


def build_safetensors(tensors: dict[str, torch.Tensor], metadata) -> tuple[dict, bytes]:
    header: dict = {}
    data = bytearray()
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    return header, bytes(data)


def pack(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def decode_safetensors(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """The independent reader: the header as the format defines it, each tensor from its bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    data = blob[8 + n :]
    out = {}
    for name, entry in header.items():
        dtype, (begin, end) = ST_DTYPES[entry["dtype"]], entry["data_offsets"]
        chunk = bytearray(data[begin:end])
        flat = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(entry["shape"])
    return out, metadata


def mutate_safetensors(rng: random.Random) -> bytes:
    tensors = _base_tensors()
    metadata = {"format": "pt", "spec": '{"a": 1}'}
    header, data = build_safetensors(tensors, metadata)
    original = copy.deepcopy(header)  # shapes and offsets to mutate from, whatever a mutation left
    names = list(tensors)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.random()
        name = rng.choice(names)
        entry = header.get(name)
        if op < 0.12 and entry:  # a dtype: another real one of the same or another size, or junk
            entry["dtype"] = rng.choice([*ST_DTYPES, "F8", "f32", "", None, 32, "F32 "])
        elif op < 0.27 and entry:  # a shape: another with the same elements, or one that does not fit
            numel = math.prod(original[name]["shape"])
            entry["shape"] = rng.choice(
                [[numel], [1, numel], [numel, 1], [], [0], [numel + 1], [-numel], [2**64], [2**63, 0], [True] * 2]
                + [random_value(rng)]
            )
        elif op < 0.42 and entry:  # offsets: shifted, swapped, reversed, or junk
            begin, end = original[name]["data_offsets"]
            shift = rng.choice((-8, -1, 1, 2, 8, 2**32, 2**64))
            other = original[rng.choice(names)]["data_offsets"] if rng.random() < 0.5 else [end, begin]
            entry["data_offsets"] = rng.choice(
                [[begin + shift, end + shift], [begin, end + shift], list(other), [begin], random_value(rng)]
            )
        elif op < 0.5:  # an entry gone, or one more
            if rng.random() < 0.5:
                header.pop(name, None)
            else:
                header[rng.choice(("new", name + "2"))] = random_value(rng)
        elif op < 0.6:  # the metadata: another shape or value type
            header["__metadata__"] = rng.choice(
                [None, [], "x", {"k": 1}, {"k": None}, {"k": ["v"]}, {"": ""}, {"k": "\x1b[2J"}, random_value(rng)]
            )
        elif op < 0.7:  # a field of an entry removed or replaced
            if entry:
                key = rng.choice(["dtype", "shape", "data_offsets", "extra"])
                if rng.random() < 0.5:
                    entry.pop(key, None)
                else:
                    entry[key] = random_value(rng)
        elif op < 0.78:  # data bytes changed: the file stays valid, the numbers change
            data = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            break  # a byte-level change below
    raw = json.dumps(header).encode()
    op = rng.random()
    if op < 0.45:
        return pack(raw, data)
    if op < 0.7:  # the header text itself
        raw = mutate_text(rng, raw.decode()).encode("utf-8", "replace")
        return pack(raw, data)
    if op < 0.8:  # the length prefix
        n = rng.choice((len(raw) + rng.choice((-2, -1, 1, 2)), 0, 2**63, 99_999_999, len(raw) + len(data)))
        return struct.pack("<Q", n) + raw + data
    blob = pack(raw, data)
    if op < 0.9:
        return blob[: rng.randrange(len(blob))]
    return blob + bytes(rng.randint(1, 16))


def test_fuzz_safetensors(tmp_path):
    def check(rng: random.Random, case: int) -> str:
        blob = mutate_safetensors(rng)
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(blob)
        loaded = read_state_dict(path)
        metadata = read_metadata(path)
        want, want_meta = decode_safetensors(blob)  # must read what the loader accepted
        assert metadata == want_meta, (metadata, want_meta)
        assert sorted(loaded) == sorted(want)
        for name, t in want.items():
            got = loaded[name]
            assert got.dtype == t.dtype and got.shape == t.shape, (name, got.dtype, t.dtype, got.shape, t.shape)
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
        return "loaded"

    start = time.perf_counter()
    counts = run_cases("safetensors", check)
    print(f"safetensors: {counts} in {time.perf_counter() - start:.1f} s")


# --- model spec JSON ------------------------------------------------------------------------------
_LEGACY = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
_NESTED = {"unet": UNetConfig, "vae": VAEConfig, "text": CLIPTextConfig, "schedule": ScheduleConfig}
_OPTIONAL_NESTED = {"text_2": CLIPTextConfig}  # SDXL's second text encoder, None for other models


def _same_value(loaded, raw, annotation: str) -> bool:
    """Whether a loaded config value is exactly the JSON value (an int is never a bool, a float
    field may hold an integer's value as a float, a tuple is a JSON list)."""
    if annotation.endswith(" | None"):
        if raw is None:
            return loaded is None
        annotation = annotation[: -len(" | None")]
    if annotation == "int":
        return type(raw) is int and type(loaded) is int and loaded == raw
    if annotation == "float":
        return type(raw) in (int, float) and type(loaded) is float and loaded == raw
    if annotation == "bool":
        return type(raw) is bool and loaded is raw
    if annotation == "str":
        return type(raw) is str and loaded == raw
    if annotation == "tuple[int, ...]":
        return isinstance(raw, list) and all(type(v) is int for v in raw) and list(loaded) == raw
    raise AssertionError(f"no rule for {annotation}")


def _check_record(obj, raw: dict, where: str) -> None:
    """Every field of the dataclass ``obj`` is the JSON's value, or the default when the JSON has none."""
    known = {f.name: f for f in fields(obj)}
    assert set(raw) <= set(known), f"{where}: loaded with unknown keys {sorted(set(raw) - set(known))}"
    for name, f in known.items():
        loaded = getattr(obj, name)
        if name in _NESTED or name in _OPTIONAL_NESTED:
            continue
        if name in raw:
            assert _same_value(loaded, raw[name], f.type), f"{where}.{name}: loaded {loaded!r} from {raw[name]!r}"
        else:
            assert f.default is not MISSING, f"{where}: loaded without the required {name!r}"
            assert loaded == f.default, f"{where}.{name}: {loaded!r} is not the default {f.default!r}"


def check_spec(spec: ModelSpec, text: str) -> None:
    data = json.loads(text)  # the loader accepted it, so plain JSON must read it too
    legacy = {k: data.pop(k) for k in _LEGACY if k in data}
    data.setdefault("schedule", legacy)
    for name in _NESTED:
        _check_record(getattr(spec, name), data.pop(name), name)
    for name in _OPTIONAL_NESTED:
        raw = data.pop(name, None)
        if raw is None:
            assert getattr(spec, name) is None, f"{name}: loaded {getattr(spec, name)!r} from nothing"
        else:
            _check_record(getattr(spec, name), raw, name)
    _check_record(spec, data, "spec")


_SPEC_NAMES = sorted({f.name for cls in (ModelSpec, *_NESTED.values()) for f in fields(cls)})


def mutate_spec(rng: random.Random) -> str:
    base = json.loads(rng.choice(list(PRESETS.values())).to_json())
    if rng.random() < 0.15:  # written before the schedule was one record
        base.update(base.pop("schedule"))
        for key in ("rescale_zero_terminal_snr", "steps_offset", "set_alpha_to_one", "timestep_spacing"):
            base.pop(key)
    tree = base
    for _ in range(rng.choice((1, 1, 2, 3))):
        tree = mutate_tree(rng, tree, _SPEC_NAMES)
    text = json.dumps(tree)
    if rng.random() < 0.2:
        text = mutate_text(rng, text)
    return text


def test_fuzz_spec_metadata():
    def check(rng: random.Random, case: int) -> str:
        text = mutate_spec(rng)
        check_spec(ModelSpec.from_json(text, "spec"), text)
        return "loaded"

    start = time.perf_counter()
    counts = run_cases("spec", check)
    print(f"spec: {counts} in {time.perf_counter() - start:.1f} s")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from safetensors.torch import load_file

    from stablediff.loading import load_pipeline, save

    path = save(load_pipeline("tiny"), tmp_path_factory.mktemp("fuzz") / "tiny.safetensors")
    return load_file(path)


def test_fuzz_spec_metadata_through_the_loader(tiny_weights, tmp_path):
    """A few mutated specs in a real file, through load_pipeline: the loaded model's spec is the
    file's, or the file is refused."""
    from safetensors.torch import save_file

    from stablediff.loading import SPEC_METADATA_KEY, load_pipeline

    tiny = json.loads(PRESETS["tiny"].to_json())

    def check(rng: random.Random, case: int) -> str:
        tree = tiny
        for _ in range(rng.choice((1, 2))):
            tree = mutate_tree(rng, tree, _SPEC_NAMES)
        text = json.dumps(tree) if case % 5 else mutate_text(rng, json.dumps(tree))
        if case % 4 == 0:
            text = json.dumps(tiny)  # unmutated: must load
        path = tmp_path / f"{case}.safetensors"
        save_file(tiny_weights, path, metadata={SPEC_METADATA_KEY: text})
        pipe = load_pipeline(path)
        check_spec(pipe.spec, text)
        return "loaded"

    run_cases("spec-file", check)


# --- PNG parameter chunks -------------------------------------------------------------------------
def _png(path: Path, **chunks: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


_PARAM_TYPES = {
    "prompt": "str",
    "negative_prompt": "str",
    "width": "int | None",
    "height": "int | None",
    "steps": "int",
    "guidance_scale": "number",
    "guidance_rescale": "number",
    "sampler": "str",
    "schedule": "str",
    "seed": "int",
    "batch_size": "int",
    "clip_skip": "int",
    "strength": "number",
    "init_image": "str | None",
    "mask": "str | None",
}


def _base_params(rng: random.Random) -> GenerationParams:
    return GenerationParams(
        rng.choice(["a cat", "a red circle, (sunset:1.3)", "x" * 300]),
        negative_prompt=rng.choice(["", "blurry"]),
        width=rng.choice([None, 64, 512]),
        height=rng.choice([None, 64, 768]),
        steps=rng.choice([1, 20, 50]),
        guidance_scale=rng.choice([1.0, 7.5, 7]),
        sampler=rng.choice(["euler", "dpmpp_2m", "ddim"]),
        schedule=rng.choice(["default", "karras"]),
        seed=rng.randrange(2**64),
        clip_skip=rng.choice([1, 2]),
        strength=rng.choice([0.5, 0.75]),
        init_image=rng.choice([None, "/home/me/in.png"]),
    )


def test_fuzz_png_record(tmp_path):
    names = [*_PARAM_TYPES, "params", "model", "model_file", "model_hash", "model_path", "latents", "format"]

    def check(rng: random.Random, case: int) -> str:
        record = _base_params(rng).to_record("m", "/models/m.safetensors", "abcdef0123")
        for _ in range(rng.choice((1, 1, 2))):
            record = mutate_tree(rng, record, names)
        text = json.dumps(record, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.15:
            text = mutate_text(rng, text)
        path = _png(tmp_path / f"{case}.png", stablediff=text)
        params, unmapped = GenerationParams.from_png(path)
        assert unmapped == []
        raw = json.loads(text)["params"]  # accepted, so it is JSON with a params object
        for name, kind in _PARAM_TYPES.items():
            loaded, value = getattr(params, name), raw.get(name, getattr(GenerationParams("x"), name))
            if name == "prompt":
                value = raw["prompt"]
            if kind == "number":
                same = type(value) in (int, float) and loaded == value and type(loaded) is type(value)
            elif kind == "int":
                same = type(value) is int and loaded == value
            elif kind == "str":
                same = type(value) is str and loaded == value
            else:
                same = value is None and loaded is None or type(value) is type(loaded) and loaded == value
            assert same, f"{name}: loaded {loaded!r} from {value!r}"
        return "loaded"

    start = time.perf_counter()
    counts = run_cases("png-record", check)
    print(f"png-record: {counts} in {time.perf_counter() - start:.1f} s")


# A1111 "Key: value" fields whose value is a number, as GenerationParams reads them.
_A1111_NUMBERS = {
    "Steps": ("steps", int),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "CFG Rescale": ("guidance_rescale", float),
}
_TOKENS = [
    "20",
    "0",
    "-1",
    "1",
    "7.5",
    "7",
    "1e3",
    "20.0",
    " 20",
    "+20",
    "",
    "abc",
    "0x14",
    "nan",
    "inf",
    "-inf",
    "1e309",
    str(2**64),
    str(2**64 - 1),
    "9" * 40,
    '"20"',
    '"7.5"',
    "1_000",
    "٢٠",
    "20 steps",
    "\x1b[31m",
]  # the kinds of tokens a hand-edited or hostile file has


def _a1111_line(items: dict[str, str]) -> str:
    def quote(text: str) -> str:
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    return ", ".join(f"{k}: {quote(v)}" for k, v in items.items())


def test_fuzz_a1111_text(tmp_path):
    def check(rng: random.Random, case: int) -> str:
        params = _base_params(rng)
        items = {
            "Steps": str(params.steps),
            "Sampler": rng.choice(["Euler", "DPM++ 2M", "DPM++ 2M Karras", "Nope"]),
            "CFG scale": str(float(params.guidance_scale)),
            "Seed": str(params.seed),
            "Size": f"{params.width or 512}x{params.height or 512}",
        }
        # What the text says, decoded here: the numbers a loaded result must hold.
        expect = {
            "steps": params.steps,
            "seed": params.seed,
            "guidance_scale": float(params.guidance_scale),
            "width": params.width or 512,
            "height": params.height or 512,
        }
        structured = rng.random() < 0.6
        if structured:  # one number field set to a known token: if it loads, it holds that token's number
            key = rng.choice([*_A1111_NUMBERS, "Size"])
            if key == "Size":
                token = rng.choice(["64x64", "8x8192", "0x64", "64x", "x", "64X64", "64x64x64", "1e2x64"])
                width, _, height = token.partition("x")
                expect["width"] = int(width) if width.isdigit() else None
                expect["height"] = int(height) if height.isdigit() else None
            else:
                token = rng.choice(_TOKENS)
                name, kind = _A1111_NUMBERS[key]
                plain = token[1:-1] if len(token) >= 2 and token[0] == token[-1] == '"' else token
                try:
                    expect[name] = kind(plain)
                except ValueError:
                    expect[name] = None  # not a number: it cannot load
            items[key] = token
        text = f"{params.prompt}\nNegative prompt: {params.negative_prompt}\n{_a1111_line(items)}"
        if not structured:
            for _ in range(rng.choice((1, 2, 3))):
                text = mutate_text(rng, text)
        path = _png(tmp_path / f"{case}.png", parameters=text)
        loaded, _ = GenerationParams.from_png(path)
        if structured:
            for name, value in expect.items():
                assert value is not None and getattr(loaded, name) == value, (name, getattr(loaded, name), value, text)
        return "loaded"

    start = time.perf_counter()
    counts = run_cases("a1111", check)
    print(f"a1111: {counts} in {time.perf_counter() - start:.1f} s")
