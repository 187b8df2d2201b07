"""The ModelSpec a file carries is checked: shape facts against the tensors, the rest against the
checksum `save` stores with it, and values no real model has are refused."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from stablediff.loading import (
    SPEC_CHECKSUM_KEY,
    SPEC_METADATA_KEY,
    bundled_model_path,
    load_pipeline,
    save,
)
from stablediff.weights.io import read_metadata

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def rewrite_metadata(path: Path, change) -> None:
    """Rewrite a safetensors file's ``__metadata__`` in place (`change` edits the dict), keeping
    every tensor byte: what a hand edit of the header does."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__", {})
    change(meta)
    header["__metadata__"] = meta
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def mutate_spec(path: Path, change, checksum: str = "keep") -> None:
    """Edit the stored spec (a dict); `checksum`: "keep" the old one, "update" it, or "drop" it
    (a file written before checksums)."""

    def edit(meta: dict) -> None:
        spec = json.loads(meta[SPEC_METADATA_KEY])
        change(spec)
        meta[SPEC_METADATA_KEY] = json.dumps(spec, sort_keys=True)
        if checksum == "update":
            meta[SPEC_CHECKSUM_KEY] = hashlib.sha256(meta[SPEC_METADATA_KEY].encode()).hexdigest()
        elif checksum == "drop":
            meta.pop(SPEC_CHECKSUM_KEY, None)

    rewrite_metadata(path, edit)


def setter(section: str | None, field: str, value):
    def change(spec: dict) -> None:
        (spec[section] if section else spec)[field] = value

    return change


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return save(load_pipeline("tiny", seed=6), tmp_path_factory.mktemp("spec") / "tiny.safetensors")


@pytest.fixture
def copy(tmp_path, tiny_file) -> Path:
    target = tmp_path / "m.safetensors"
    shutil.copyfile(tiny_file, target)
    return target


def test_saved_spec_carries_its_checksum(tiny_file):
    meta = read_metadata(tiny_file)
    assert meta[SPEC_CHECKSUM_KEY] == hashlib.sha256(meta[SPEC_METADATA_KEY].encode()).hexdigest()
    assert load_pipeline(tiny_file).spec == load_pipeline("tiny").spec


@pytest.mark.parametrize(
    "change",
    [
        setter("vae", "scaling_factor", 0.13025),
        setter("schedule", "beta_end", 0.02),
        setter("schedule", "beta_start", 0.0001),
        setter("unet", "num_heads", 4),  # a head count: invisible in the weights
        setter(None, "prediction_type", "v_prediction"),
        setter("unet", "model_channels", 64),
    ],
    ids=["scaling_factor", "beta_end", "beta_start", "num_heads", "prediction_type", "model_channels"],
)
def test_a_modified_spec_is_refused(copy, change):
    mutate_spec(copy, change)
    with pytest.raises(ValueError, match="spec metadata was modified") as err:
        load_pipeline(copy)
    assert str(copy) in str(err.value)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path, node


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    return (value or "") + "x" if isinstance(value, str) or value is None else value


def test_no_field_of_the_spec_changes_silently(copy, tiny_file):
    """Every leaf of the stored spec, changed alone with the checksum left as it was, is refused."""
    spec = json.loads(read_metadata(tiny_file)[SPEC_METADATA_KEY])
    leaves = list(_leaves(spec))
    assert len(leaves) > 40
    for path, value in leaves:
        shutil.copyfile(tiny_file, copy)

        def change(d, path=path, value=value):
            for key in path[:-1]:
                d = d[key]
            d[path[-1]] = _changed(value)

        mutate_spec(copy, change)
        with pytest.raises(ValueError, match="spec metadata was modified"):
            load_pipeline(copy)


@pytest.mark.parametrize("checksum", ["update", "drop"])
@pytest.mark.parametrize(
    ("section", "field", "stored", "actual"),
    [
        ("unet", "model_channels", 64, 32),
        ("unet", "num_res_blocks", 3, 2),
        ("unet", "attention_levels", [0, 1], (1,)),
        ("vae", "z_channels", 8, 4),
        ("vae", "ch_mult", [1, 2, 2], (1, 2)),
        ("text", "layers", 4, 3),
        ("text", "vocab_size", 49000, 49408),
    ],
)
def test_shape_facts_are_checked_against_the_tensors(copy, checksum, section, field, stored, actual):
    """A spec whose checksum matches (or that has none) but whose shapes do not match the weights
    is refused, naming the file, the field, the stored and the inferred value."""
    mutate_spec(copy, setter(section, field, stored), checksum)
    stored_repr = repr(tuple(stored) if isinstance(stored, list) else stored)
    with pytest.raises(ValueError) as err:
        load_pipeline(copy)
    message = str(err.value)
    assert str(copy) in message and f"{section}.{field} is {stored_repr} in the spec but {actual!r}" in message


def test_files_without_checksum_load_as_before(copy, tiny_file):
    mutate_spec(copy, setter("vae", "scaling_factor", 0.13025), checksum="drop")
    assert load_pipeline(copy).spec.vae.scaling_factor == 0.13025
    shutil.copyfile(tiny_file, copy)
    rewrite_metadata(copy, lambda meta: meta.pop(SPEC_METADATA_KEY))
    with pytest.raises(ValueError, match="has a stablediff.spec_sha256 but no stablediff.spec"):
        load_pipeline(copy)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (setter("vae", "scaling_factor", 0.0), "scaling_factor"),
        (setter("vae", "scaling_factor", -0.18215), "scaling_factor"),
        # JSON itself has no infinity or NaN: refused as such, or as a scaling factor
        (setter("vae", "scaling_factor", math.inf), "scaling_factor|Infinity is not a JSON number"),
        (setter("vae", "scaling_factor", math.nan), "scaling_factor|NaN is not a JSON number"),
        (setter("schedule", "beta_start", 0.012), "beta"),  # == beta_end
        (setter("schedule", "beta_start", 0.02), "beta"),  # > beta_end
        (setter("schedule", "beta_start", 0.0), "beta"),
        (setter("schedule", "beta_end", 1.5), "beta"),
        (setter("schedule", "beta_start", -0.001), "beta"),
    ],
)
def test_values_no_model_has_are_refused(copy, change, word):
    mutate_spec(copy, change, checksum="update")  # consistent with its checksum, and still refused
    with pytest.raises(ValueError, match=word) as err:
        load_pipeline(copy)
    assert str(copy) in str(err.value)


def test_diffusers_folder_spec_is_checked(tmp_path):
    folder = save(load_pipeline("tiny", seed=7), tmp_path / "d", layout="diffusers")
    unet_file = folder / UNET_FILE
    original = unet_file.read_bytes()
    mutate_spec(unet_file, setter("vae", "scaling_factor", 0.5))
    with pytest.raises(ValueError, match="spec metadata was modified") as err:
        load_pipeline(folder)
    assert str(unet_file) in str(err.value)
    # consistent checksum, but the spec contradicts the folder's own configs
    unet_file.write_bytes(original)
    mutate_spec(unet_file, setter("unet", "model_channels", 64), checksum="update")
    with pytest.raises(ValueError, match=r"unet\.model_channels is 64 in the spec but 32 in .*unet/config\.json"):
        load_pipeline(folder)
    unet_file.write_bytes(original)
    mutate_spec(unet_file, setter("vae", "z_channels", 8), checksum="drop")
    with pytest.raises(ValueError, match=r"vae\.z_channels is 8 in the spec but 4 in .*vae/config\.json"):
        load_pipeline(folder)
    # without our metadata the configs are the spec, and their values are checked too
    save_file(load_file(unet_file), unet_file)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "beta_start": 0.5}))
    with pytest.raises(ValueError, match="0 < beta_start < beta_end < 1") as err:
        load_pipeline(folder)
    assert str(folder) in str(err.value)


def test_bundled_model_loads_unchanged_and_is_checked(tmp_path):
    path = bundled_model_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = read_metadata(path)
    assert SPEC_CHECKSUM_KEY not in meta  # written before checksums: it loads as before
    pipe = load_pipeline("shapes")
    assert pipe.spec.unet.norm_groups != 32  # a small layout the SD presets do not cover
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # its shapes are still checked against its tensors
    copy = tmp_path / "shapes.safetensors"
    shutil.copyfile(path, copy)
    channels = pipe.spec.unet.model_channels
    mutate_spec(copy, setter("unet", "model_channels", channels * 2), checksum="drop")
    with pytest.raises(ValueError, match=f"unet.model_channels is {channels * 2} in the spec but {channels} in"):
        load_pipeline(copy)
