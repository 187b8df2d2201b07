"""Presets, spec recognition, round trips and EMA selection."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablediff.diffusion import ScheduleConfig
from stablediff.loading import SPEC_METADATA_KEY, bundled_model_path, load_pipeline, save
from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetModel
from stablediff.models.vae import AutoencoderKL
from stablediff.presets import PRESETS, ModelSpec, infer_spec
from stablediff.weights import convert
from stablediff.weights.io import read_metadata


def _assert_same_weights(a, b) -> None:
    for part, sd in a.state_dicts().items():
        other = b.state_dicts()[part]
        assert set(sd) == set(other), part
        for k, v in sd.items():
            assert v.dtype == other[k].dtype and torch.equal(v, other[k]), f"{part}.{k}"


def _meta_single_file(spec) -> dict:
    """An original-layout state dict of meta tensors: shapes without memory, so the full-size
    configurations can be recognised in a test."""
    with torch.device("meta"):
        nets = UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextModel(spec.text)
    return convert.join_single_file(*(n.state_dict() for n in nets), spec.text_format)


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd2-base", "sd2-inpaint"])
def test_infer_spec_recognises_presets(name):
    preset = PRESETS[name]
    spec = infer_spec(_meta_single_file(preset))
    assert spec.unet == preset.unet
    assert spec.vae == preset.vae
    assert spec.text == preset.text
    assert spec.is_inpaint == name.endswith("inpaint")
    assert spec.name.startswith("sd2" if name.startswith("sd2") else "sd1")


def test_v_prediction_is_explicit():
    """v-prediction cannot be seen in weights: the 768-v preset's weights read as SD 2.x eps
    unless the caller says otherwise."""
    sd = _meta_single_file(PRESETS["sd2"])
    assert infer_spec(sd).prediction_type == "epsilon"
    assert infer_spec(sd, prediction_type="v_prediction").prediction_type == "v_prediction"


def test_real_sd15_key_counts():
    """The full SD 1.5 layout has the key counts of the official checkpoint (REFERENCE.md)."""
    sd = _meta_single_file(PRESETS["sd15"])
    count = lambda prefix: sum(k.startswith(prefix) for k in sd)  # noqa: E731
    assert count("model.diffusion_model.") == 686
    assert count("first_stage_model.") == 248
    assert count("cond_stage_model.transformer.") == 196


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_round_trip_is_bit_exact(name, layout, tmp_path):
    pipe = load_pipeline(name, seed=5)
    path = save(pipe, tmp_path / "model", layout=layout)
    back = load_pipeline(path)
    if layout == "diffusers" and pipe.spec.text.skip_layers:
        # transformers runs every layer it has, so the skipped SD2 layer is not written; the
        # kept layers round-trip exactly and the context is unchanged.
        ids = torch.tensor(pipe.tokenizer(["a red circle"]))
        assert torch.equal(pipe.text_encoder(ids), back.text_encoder(ids))
        pipe.text_encoder = back.text_encoder
    else:
        assert back.spec == pipe.spec
    _assert_same_weights(pipe, back)


def test_save_does_not_overwrite(tmp_path):
    pipe = load_pipeline("tiny")
    path = save(pipe, tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError, match="exists"):
        save(pipe, path)
    save(pipe, path, overwrite=True)
    with pytest.raises(ValueError, match="layout 'zip' not in"):
        save(pipe, tmp_path / "other", layout="zip")
    assert not (tmp_path / "other").exists()


def test_foreign_single_file_without_metadata(tmp_path):
    """A checkpoint without our metadata is recognised from its keys and shapes."""
    pipe = load_pipeline("tiny", seed=2)
    path = save(pipe, tmp_path / "ours.safetensors")
    foreign = tmp_path / "foreign.ckpt"  # a safetensors file with a misleading name
    save_file(load_file(path), foreign)
    back = load_pipeline(foreign)
    assert back.spec.name == "sd1"
    _assert_same_weights(pipe, back)


def test_ema_weights_used_when_present(tmp_path):
    pipe = load_pipeline("tiny", seed=3)
    sd = load_file(save(pipe, tmp_path / "a.safetensors"))
    ema = {}
    for k, v in list(sd.items()):
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + k[len("model.") :].replace(".", "")] = v + 1.0
    path = tmp_path / "ema.safetensors"
    save_file({**sd, **ema}, path)
    key = "input_blocks.0.0.weight"
    with_ema = load_pipeline(path).unet.state_dict()[key]
    without = load_pipeline(path, use_ema=False).unet.state_dict()[key]
    assert torch.equal(without, pipe.unet.state_dict()[key])
    assert torch.equal(with_ema, pipe.unet.state_dict()[key] + 1.0)


def test_dtype_and_presets():
    pipe = load_pipeline("tiny", dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="presets are"):
        load_pipeline("no-such-model")


def test_loading_builds_on_meta_device(tmp_path, monkeypatch):
    """Networks are created on the meta device and filled by assignment: no random init runs."""
    path = save(load_pipeline("tiny"), tmp_path / "m.safetensors")
    calls = []
    original = torch.nn.init.kaiming_uniform_

    def spy(tensor, *args, **kwargs):
        calls.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    load_pipeline(path)
    assert calls and set(calls) == {"meta"}


def test_trained_tokenizer_travels_in_metadata(tmp_path):
    """A model with its own (trained) vocabulary loads back with that vocabulary from one file."""
    from stablediff.tokenizer import CLIPTokenizer

    pipe = load_pipeline("tiny")
    base = pipe.tokenizer
    keep = [t for t, i in base.encoder.items() if i < 600]
    vocab = {t: i for i, t in enumerate(keep + ["<|startoftext|>", "<|endoftext|>"])}
    merges = [m for m in base.merges if "".join(m) in vocab][:80]
    pipe.tokenizer = CLIPTokenizer(vocab, merges)
    back = load_pipeline(save(pipe, tmp_path / "m.safetensors"))
    assert back.tokenizer.encoder == vocab and back.tokenizer.merges == pipe.tokenizer.merges
    assert back.tokenizer("a red circle") == pipe.tokenizer("a red circle")
    assert not back.tokenizer.is_default_vocabulary() and load_pipeline("tiny").tokenizer.is_default_vocabulary()


_LEGACY_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
_LINEAR = ScheduleConfig(num_train_timesteps=500, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def test_spec_json_nests_the_schedule_and_reads_the_legacy_flat_form():
    spec = dataclasses.replace(PRESETS["tiny-sd2"], schedule=_LINEAR)
    stored = json.loads(spec.to_json())
    assert stored["schedule"]["beta_schedule"] == "linear" and not set(_LEGACY_KEYS) & set(stored)
    assert ModelSpec.from_json(spec.to_json()) == spec
    # specs written before `schedule` existed (the bundled model's among them) store it flat
    legacy = {k: v for k, v in stored.items() if k != "schedule"}
    legacy.update({k: stored["schedule"][k] for k in _LEGACY_KEYS})
    assert ModelSpec.from_json(json.dumps(legacy)) == spec
    with pytest.raises(ValueError, match="both a 'schedule' and the flat schedule keys"):
        ModelSpec.from_json(json.dumps({**stored, "beta_end": 0.02}))
    with pytest.raises(ValueError, match=r"prediction_type 'eps' not in \('epsilon', 'v_prediction', 'sample'\)"):
        dataclasses.replace(spec, prediction_type="eps")  # specs store diffusers' names
    bundled = json.loads(read_metadata(bundled_model_path())[SPEC_METADATA_KEY])
    assert "schedule" not in bundled and set(_LEGACY_KEYS) <= set(bundled)
    assert ModelSpec.from_json(json.dumps(bundled)).schedule == ScheduleConfig()


def test_diffusers_scheduler_config_carries_the_schedule(tmp_path):
    pipe = load_pipeline("tiny")
    folder = save(pipe, tmp_path / "default", layout="diffusers")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    }
    # a folder without our metadata: the schedule and prediction type come from scheduler_config.json
    pipe.spec = dataclasses.replace(pipe.spec, schedule=_LINEAR, prediction_type="v_prediction")
    folder = save(pipe, tmp_path / "linear", layout="diffusers")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(unet_file), unet_file)
    back = load_pipeline(folder)
    assert back.spec.name == "diffusers:linear" and back.spec.schedule == _LINEAR
    assert back.spec.prediction_type == "v_prediction"
    assert load_pipeline(folder, prediction_type="epsilon").spec.prediction_type == "epsilon"
