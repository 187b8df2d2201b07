"""Bad checkpoints through load_pipeline: each gives a clear error, and a pickle never runs code."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablediff.loading import load_pipeline, save
from stablediff.weights.io import CheckpointError
from stablediff.weights.strict import WeightMismatchError


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return save(load_pipeline("tiny"), tmp_path_factory.mktemp("m") / "tiny.safetensors")


def test_other_architecture_names_first_mismatching_key(tiny_file):
    message = r"unet: key 'input_blocks.4.1.proj_in.weight' has shape \(64, 64, 1, 1\) in the checkpoint but \(64, 64\)"
    with pytest.raises(WeightMismatchError, match=message):
        load_pipeline(tiny_file, spec="tiny-sd2")


def test_wrong_shape_names_key_and_both_shapes(tiny_file, tmp_path):
    sd = load_file(tiny_file)
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3 + 1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    with pytest.raises(
        WeightMismatchError,
        match=r"'out.2.weight' has shape \(4, 32, 3, 4\) in the checkpoint "
        r"but \(4, 32, 3, 3\)",
    ):
        load_pipeline(bad)


def test_missing_and_unexpected_keys(tiny_file, tmp_path):
    sd = load_file(tiny_file)
    del sd["first_stage_model.quant_conv.bias"]
    path = tmp_path / "missing.safetensors"
    save_file(sd, path)
    with pytest.raises(WeightMismatchError, match=r"vae: key 'quant_conv.bias' \(shape \(8,\)\) is missing"):
        load_pipeline(path, spec="tiny")
    sd = load_file(tiny_file)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(3)
    save_file(sd, path)
    with pytest.raises(WeightMismatchError, match=r"unet: unexpected key 'extra.weight'"):
        load_pipeline(path, spec="tiny")


def test_not_a_stable_diffusion_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint.*encoder.weight"):
        load_pipeline(path)


def test_truncated_zero_byte_and_lfs_pointer(tiny_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pipeline(truncated)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pipeline(empty)
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3438167536\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        load_pipeline(pointer)


def test_huge_header_and_overlapping_offsets(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header"):
        load_pipeline(huge)
    header = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    ).encode()
    overlap = tmp_path / "overlap.safetensors"
    overlap.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(CheckpointError, match="overlap"):
        load_pipeline(overlap)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    for name, save_fn in {
        "zip.ckpt": lambda p: torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload(marker)}, p),
        "raw.pt": lambda p: p.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=2)),
    }.items():
        path = tmp_path / name
        save_fn(path)
        with pytest.raises(CheckpointError, match=r"(posix|os)\.system"):
            load_pipeline(path)
        assert not marker.exists()


def test_diffusers_folder_missing_vae(tiny_file, tmp_path):
    folder = save(load_pipeline(tiny_file), tmp_path / "folder", layout="diffusers")
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=r"missing vae/"):
        load_pipeline(folder)
