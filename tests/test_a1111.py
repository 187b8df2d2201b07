"""AUTOMATIC1111 interoperability: `--from` re-runs a PNG that carries only A1111's `parameters`
text and lists what it cannot reproduce; "Automatic" means what A1111 1.9+ means; our PNGs write
the schedule type A1111 needs, never "Automatic"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from stablediff.cli import main
from stablediff.diffusion import SAMPLERS, NoiseSchedule, sampling_plan
from stablediff.errors import BadFileError
from stablediff.image import read_png_metadata, save_png
from stablediff.loading import load_pipeline
from stablediff.params import (
    A1111_AUTOMATIC,
    A1111_DEFAULT_AS,
    A1111_SAMPLERS,
    A1111_SCHEDULES,
    SCHEDULES,
    GenerationParams,
    parse_a1111,
)

# An infotext as A1111 1.10 writes it (hires fix and ADetailer on, a LoRA in the prompt); the size and
# step count are small so that the tiny preset runs it in a second.
A1111_TEXT = (
    "a red circle above a blue square, <hypernet:anime:0.8>\n"
    "Negative prompt: ugly, blurry\n"
    "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
    "ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, Hires upscale: 2, Hires steps: 10, "
    "Hires upscaler: Latent, Version: v1.10.1"
)
# A1111 1.10's "scheduler" option per sampler (modules/sd_samplers_kdiffusion.py); none = the model's
# get_sigmas = "Uniform". DDIM, PLMS and UniPC (sd_samplers_timesteps.py) ignore the schedule type.
AUTOMATIC = {
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2M SDE": "exponential",
    "DPM++ 2S a": "karras",
    "DPM2": "karras",
    "Euler a": "uniform",
    "Euler": "uniform",
    "LMS": "uniform",
    "Heun": "uniform",
    "DDIM": "default",
    "PLMS": "default",
    "UniPC": "default",
    "LCM": "default",
}


def a1111_png(path, text: str = A1111_TEXT) -> str:
    """A PNG as A1111 saves it: the `parameters` text chunk and nothing of ours."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)
    return str(path)


def test_generate_from_an_a1111_png(tmp_path, capsys) -> None:
    png = a1111_png(tmp_path / "a1111.png")
    assert read_png_metadata(png)["stablediff"] is None
    code = main(["generate", "--from", png, "--model", "tiny", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    made = out.strip()
    record = read_png_metadata(made)["stablediff"]["params"]
    expected = {
        "prompt": "a red circle above a blue square, ",  # the hypernetwork tag removed, as A1111 removes it
        "negative_prompt": "ugly, blurry",
        "steps": 12,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "guidance_scale": 7.0,
        "seed": 1,
        "width": 64,
        "height": 64,
        "clip_skip": 2,
    }
    assert {k: record[k] for k in expected} == expected
    assert Image.open(made).size == (64, 64)
    # every field it could not map is named on stderr, one line each
    warnings = [line.split(": warning: ", 1)[1] for line in err.splitlines() if ": warning: " in line]
    assert all(line.startswith(f"{png}: ") for line in warnings)
    keys = [line[len(png) + 2 :].split(": ")[0] for line in warnings]
    assert sorted(keys) == sorted(
        ["Prompt", "Model", "RNG", "ADetailer model", "ADetailer confidence"]
        + ["Hires upscale", "Hires steps", "Hires upscaler"]
    )
    assert "<hypernet:anime:0.8>" in warnings[keys.index("Prompt")]
    # the image is what those parameters give
    params = GenerationParams(**{k: v for k, v in expected.items()})
    direct = load_pipeline("tiny").generate(params)[0]
    assert np.array_equal(np.asarray(direct), np.asarray(Image.open(made)))


def test_from_png_api(tmp_path) -> None:
    params, unmapped = GenerationParams.from_png(a1111_png(tmp_path / "a.png"))
    assert (params.sampler, params.schedule, params.steps, params.strength) == ("dpmpp_2m", "karras", 12, 0.7)
    assert len(unmapped) == 8 and unmapped[0].startswith("Prompt: <hypernet:anime:0.8>")
    # one of ours: the JSON record, nothing unmapped
    ours = GenerationParams("a cat", width=64, height=64, sampler="dpmpp_sde", schedule="beta", seed=5)
    path = tmp_path / "ours.png"
    save_png(Image.new("RGB", (64, 64)), path, ours.to_a1111(), ours.to_record("tiny", "tiny", None))
    assert GenerationParams.from_png(path) == (ours, [])
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    with pytest.raises(BadFileError, match="carries no generation parameters"):
        GenerationParams.from_png(bare)
    with pytest.raises(BadFileError, match="A1111 parameters: steps must be an int >= 1, got 0"):
        GenerationParams.from_png(a1111_png(tmp_path / "bad.png", "x\nSteps: 0, Sampler: Euler, Seed: 1"))


@pytest.mark.parametrize(("label", "schedule"), list(AUTOMATIC.items()))
def test_automatic_is_what_a1111_picks(label: str, schedule: str) -> None:
    for text in (
        f"x\nSteps: 20, Sampler: {label}, Schedule type: Automatic, CFG scale: 7, Seed: 1, RNG: CPU",
        f"x\nSteps: 20, Sampler: {label}, CFG scale: 7, Seed: 1, RNG: CPU",  # before 1.9: no schedule type
    ):
        params, unmapped = GenerationParams.read_a1111(text)
        assert (params.sampler, params.schedule, unmapped) == (
            {v: k for k, v in A1111_SAMPLERS.items()}[label],
            schedule,
            [],
        )
        assert GenerationParams.from_a1111(text) == params


def test_schedule_types_read_and_written() -> None:
    for ours, label in A1111_SCHEDULES.items():
        params, unmapped = GenerationParams.read_a1111(f"x\nSteps: 9, Sampler: Euler, Schedule type: {label}, Seed: 1")
        assert params.schedule == ours and unmapped == [f"RNG: GPU {unmapped[0][9:]}"]
        assert f"Schedule type: {label}," in GenerationParams("x", sampler="euler", schedule=ours).to_a1111()
    assert GenerationParams.from_a1111("x\nSteps: 9, Sampler: Euler, Schedule type: SGMUniform, Seed: 1").schedule == (
        "sgm_uniform"
    )
    # pre-1.9 names carry the schedule; A1111's timestep samplers ignore the schedule type
    assert GenerationParams.from_a1111("x\nSteps: 9, Sampler: DPM++ SDE Karras, Seed: 1").schedule == "karras"
    assert GenerationParams.from_a1111("x\nSteps: 9, Sampler: DDIM, Schedule type: Karras, Seed: 1").schedule == (
        "default"
    )


def test_our_pngs_never_write_automatic() -> None:
    assert set(A1111_AUTOMATIC) == set(A1111_DEFAULT_AS) == set(A1111_SAMPLERS) == set(SAMPLERS)
    assert set(A1111_SCHEDULES) == set(SCHEDULES) - {"default"}
    labels = set(A1111_SCHEDULES.values())
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            info = parse_a1111(GenerationParams("x", sampler=sampler, schedule=schedule).to_a1111())
            assert info["Schedule type"] in labels and info["RNG"] == "CPU"
            if schedule == "default":
                assert info["Schedule type"] == A1111_SCHEDULES[A1111_DEFAULT_AS[sampler]]


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "lms", "dpmpp_2s_a", "dpmpp_2m", "unipc", "ddim"])
def test_default_is_written_as_the_closest_a1111_type(sampler: str) -> None:
    """Of all A1111 types, the one written for "default" has the sigmas nearest to ours (equal for
    dpmpp_sde and, when the steps divide 1000, for DDIM's leading timesteps)."""
    ns = NoiseSchedule()
    for steps in (10, 20, 25, 50):
        ours = sampling_plan(sampler, ns, steps).sigmas[:-1].double().log()
        gaps = {}
        for schedule in SCHEDULES[1:]:
            theirs = sampling_plan(sampler, ns, steps, schedule).sigmas[:-1].double()
            if len(theirs) == len(ours):
                gaps[schedule] = float((theirs.log() - ours).abs().max())
        assert min(gaps, key=gaps.get) == A1111_DEFAULT_AS[sampler], gaps
    same = sampling_plan("dpmpp_sde", ns, 20)
    assert torch.equal(same.sigmas, sampling_plan("dpmpp_sde", ns, 20, "uniform").sigmas)


def test_what_cannot_be_mapped_is_listed() -> None:
    text = (
        "a cat <hypernet:anime:1>\nNegative prompt: <lora:bad:1> ugly\n"
        "Steps: 20, Sampler: DPM++ 3M SDE, Schedule type: Align Your Steps GITS, CFG scale: 5, Seed: 2, "
        "Eta: 0.7, ENSD: 31337, RNG: NV, Version: v1.10.1"
    )
    params, unmapped = GenerationParams.read_a1111(text)
    assert (params.prompt, params.negative_prompt) == ("a cat ", " ugly")
    assert (params.sampler, params.schedule) == ("dpmpp_2m", "karras")
    assert [item.split(" (")[0] for item in unmapped] == [
        "Sampler: DPM++ 3M SDE",
        "Schedule type: Align Your Steps GITS",
        "Prompt: <hypernet:anime:1>",
        "Negative prompt: <lora:bad:1>",
        "RNG: NV",
        "ENSD: 31337",
        "Eta: 0.7",
    ]
    # from_a1111 keeps what it does not know, for validate to name
    kept = GenerationParams.from_a1111(text)
    assert (kept.sampler, kept.schedule, kept.prompt) == (
        "DPM++ 3M SDE",
        "Align Your Steps GITS",
        "a cat <hypernet:anime:1>",
    )
    with pytest.raises(ValueError, match="unknown sampler 'DPM\\+\\+ 3M SDE'"):
        kept.validate()
    assert GenerationParams.read_a1111("x\nSteps: 2, Sampler: Euler, Seed: 1, RNG: CPU, ENSD: 0")[1] == []
