"""SDXL on the command line (issue 19): the second prompts and micro-conditioning flags, the base ->
refiner hand-off (`--refiner`, `--switch-at`) and its PNG record, the per-generation timestep
spacing (`--spacing`), SDXL-Turbo's settings against diffusers, and the memory estimate's second
text tower and refiner.

Parity cases use a tiny random SDXL base written by diffusers' own `save_pretrained` (the helpers
of test_sdxl_pipeline), once with SDXL base's scheduler config (Euler, "leading") and once with
SDXL-Turbo's (Euler ancestral, "trailing"); every pixel must agree within 1/255.
"""

from __future__ import annotations

import json
import re
from argparse import Namespace
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_sdxl_pipeline import SDXL_SCHEDULER, _compare, tiny_xl_pipeline

from stablediff.cli import main
from stablediff.cli_sdxl import refiner_choice
from stablediff.errors import BadFileError
from stablediff.image import read_png_metadata
from stablediff.loading import load_pipeline
from stablediff.memory import GIB, estimate_generation, weight_bytes
from stablediff.params import GenerationParams
from stablediff.presets import PRESETS

PROMPT = "a red circle above a blue square"
# SDXL-Turbo's published scheduler_config.json, less the keys diffusers' schedulers ignore
TURBO_SCHEDULER = {
    **SDXL_SCHEDULER,
    "_class_name": "EulerAncestralDiscreteScheduler",
    "timestep_spacing": "trailing",
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"leading": (diffusers pipeline, folder), "turbo": (...)}: one tiny SDXL base, two scheduler
    configs (the diffusers pipeline is shared: each test sets its scheduler)."""
    from diffusers import EulerAncestralDiscreteScheduler

    tmp = tmp_path_factory.mktemp("sdxl_cli")
    pipe = tiny_xl_pipeline(tmp, EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER), 60)
    out = {}
    for name, config in (("leading", SDXL_SCHEDULER), ("turbo", TURBO_SCHEDULER)):
        pipe.save_pretrained(tmp / name)
        (tmp / name / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        out[name] = (pipe, tmp / name)
    return out


# ---- timestep spacing ------------------------------------------------------------------------


@torch.no_grad()
def test_spacing_override_matches_diffusers_with_that_scheduler_config(folders):
    from diffusers import EulerDiscreteScheduler

    reference, folder = folders["leading"]
    ours = load_pipeline(folder)
    assert ours.spec.schedule.timestep_spacing == "leading"
    params = GenerationParams(PROMPT, width=64, height=64, steps=8, guidance_scale=6.0, sampler="euler", seed=9)
    reference.scheduler = EulerDiscreteScheduler.from_config({**SDXL_SCHEDULER, "timestep_spacing": "trailing"})
    call = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=8, guidance_scale=6.0, output_type="np")
    expected = reference(**call, generator=torch.Generator().manual_seed(9)).images[0]
    trailing = ours.generate(replace(params, spacing="trailing"))[0]
    _compare(trailing, expected, "spacing 'trailing' over the folder's 'leading'")
    leading = np.asarray(ours.generate(params)[0]).astype(int)  # the override changes the image
    assert np.abs(leading - np.asarray(trailing).astype(int)).max() > 8


def test_spacing_flag_is_recorded_and_restored(folders, tmp_path, capsys):
    folder = str(folders["leading"][1])
    argv = ["--model", folder, "--steps", "3", "--sampler", "euler", "--seed", "4", "--width", "64", "--height", "64"]
    code, out, _ = run(capsys, "generate", PROMPT, *argv, "--spacing", "trailing", "--out", str(tmp_path / "a"))
    assert code == 0
    record = read_png_metadata(out.strip())["stablediff"]
    assert record["params"]["spacing"] == "trailing"
    params = GenerationParams(PROMPT, **_size(64), steps=3, sampler="euler", seed=4, spacing="trailing")
    assert np.array_equal(pixels(out.strip()), np.asarray(load_pipeline(folder).generate(params)[0]))
    code, again, _ = run(capsys, "generate", "--from", out.strip(), "--model", folder, "--out", str(tmp_path / "b"))
    assert code == 0 and np.array_equal(pixels(again.strip()), pixels(out.strip()))


def test_spacing_checks(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown spacing 'even'; valid choices: leading, trailing, linspace"):
        GenerationParams("a", spacing="even").validate()
    with pytest.raises(SystemExit):
        main(["generate", "a", "--model", "tiny", "--spacing", "even", "--out", str(tmp_path / "o")])
    assert "--spacing: invalid choice: 'even'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _size(n: int) -> dict:
    return {"width": n, "height": n}


# ---- SDXL-Turbo --------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4])
@torch.no_grad()
def test_turbo_matches_diffusers_without_guidance(folders, steps):
    """SDXL-Turbo's model card: StableDiffusionXLPipeline(prompt, num_inference_steps=1..4,
    guidance_scale=0.0) with its Euler ancestral "trailing" scheduler; one U-Net row per step (no
    negative pass), and guidance 1.0 is the same image."""
    from diffusers import EulerAncestralDiscreteScheduler

    reference, folder = folders["turbo"]
    reference.scheduler = EulerAncestralDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    ours = load_pipeline(folder)
    assert ours.spec.schedule.timestep_spacing == "trailing"
    rows = []
    hook = ours.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        params = GenerationParams(PROMPT, **_size(64), steps=steps, guidance_scale=0.0, sampler="euler_a", seed=21)
        image = ours.generate(params)[0]
    finally:
        hook.remove()
    assert rows == [1] * steps
    call = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=0.0, output_type="np")
    expected = reference(**call, generator=torch.Generator().manual_seed(21)).images[0]
    _compare(image, expected, f"turbo, {steps} step(s), guidance 0")
    if steps == 1:
        assert np.array_equal(np.asarray(ours.generate(replace(params, guidance_scale=1.0))[0]), np.asarray(image))


def test_turbo_command_line(folders, tmp_path, capsys):
    """The documented command (docs/sdxl.md): --sampler euler_a --steps 1 --cfg 0."""
    folder = str(folders["turbo"][1])
    code, out, _ = run(
        capsys, "generate", PROMPT, "--model", folder, "--sampler", "euler_a", "--steps", "1", "--cfg", "0",
        "--seed", "21", "--width", "64", "--height", "64", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    params = GenerationParams(PROMPT, **_size(64), steps=1, guidance_scale=0.0, sampler="euler_a", seed=21)
    assert np.array_equal(pixels(out.strip()), np.asarray(load_pipeline(folder).generate(params)[0]))


# ---- the base -> refiner hand-off on the command line --------------------------------------------

SDXL_ARGS = {
    "--prompt-2": ("prompt_2", "oil painting"),
    "--negative-2": ("negative_prompt_2", "text"),
    "--original-size": ("original_size", "128x96"),
    "--target-size": ("target_size", "96x64"),
    "--crops": ("crops_coords_top_left", "4,8"),
    "--aesthetic-score": ("aesthetic_score", "7.5"),
    "--negative-aesthetic-score": ("negative_aesthetic_score", "1.5"),
}


def test_refiner_run_is_the_python_hand_off_and_reproduces_from_png(tmp_path, capsys):
    flags = [x for flag, (_, value) in SDXL_ARGS.items() for x in (flag, value)]
    common = ["--steps", "4", "--sampler", "euler", "--seed", "11", "--negative", "blurry"]
    code, out, _ = run(
        capsys, "generate", PROMPT, "--model", "tiny-sdxl", "--refiner", "tiny-sdxl-refiner", "--switch-at", "0.7",
        *common, *flags, "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert code == 0
    path = out.strip()
    meta = read_png_metadata(path)
    assert "Model: tiny-sdxl, RNG: CPU, Refiner: tiny-sdxl-refiner, Refiner switch at: 0.7," in meta["parameters"]
    record = meta["stablediff"]
    assert record["refiner"] == {
        "model": "tiny-sdxl-refiner", "model_file": "tiny-sdxl-refiner", "model_hash": None, "switch_at": 0.7,
    }  # fmt: skip
    params, _ = GenerationParams.from_record(record, path)
    expected_fields = dict(
        prompt_2="oil painting", negative_prompt_2="text", original_size=(128, 96), target_size=(96, 64),
        crops_coords_top_left=(4, 8), aesthetic_score=7.5, negative_aesthetic_score=1.5,
    )  # fmt: skip
    assert {k: getattr(params, k) for k in expected_fields} == expected_fields
    assert params.denoising_start is None and params.denoising_end is None

    # the same as docs/sdxl.md's Python hand-off
    base, refiner = load_pipeline("tiny-sdxl"), load_pipeline("tiny-sdxl-refiner")
    latents = base.sample_latents(replace(params, denoising_end=0.7))
    image = refiner.generate(replace(params, denoising_start=0.7), init_latents=latents)[0]
    assert np.array_equal(pixels(path), np.asarray(image))

    # --from restores every SDXL field, the refiner and its switch
    code, again, err = run(capsys, "generate", "--from", path, "--out", str(tmp_path / "b"))
    assert code == 0 and "using the model 'tiny-sdxl-refiner' named in the PNG" in err
    assert np.array_equal(pixels(again.strip()), pixels(path))
    assert read_png_metadata(again.strip())["stablediff"]["refiner"]["switch_at"] == 0.7
    # flags given win over the PNG's refiner and switch
    stored = record["refiner"]
    found = "tiny-sdxl-refiner"  # the PNG's file, as the command line found it
    assert refiner_choice(Namespace(refiner=None, switch_at=0.5), stored, found) == (found, 0.5)
    assert refiner_choice(Namespace(refiner="sdxl-refiner", switch_at=None), stored, None) == ("sdxl-refiner", 0.7)


@pytest.mark.parametrize("flag", [*SDXL_ARGS, "--refiner"])
def test_sdxl_flags_for_a_non_sdxl_model_name_the_flag(flag, tmp_path, capsys):
    value = "tiny-sdxl-refiner" if flag == "--refiner" else SDXL_ARGS[flag][1]
    code, _, err = run(capsys, "generate", "a", "--model", "tiny", flag, value, "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"error: {flag} is an SDXL option, and 'tiny' is not an SDXL model" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny-sdxl", "--aesthetic-score", "7"], "--aesthetic-score conditions an SDXL refiner; "),
        (["--model", "tiny-sdxl-refiner", "--target-size", "64x64"], "--target-size is not used by an SDXL refiner"),
        (["--model", "tiny-sdxl-refiner", "--prompt-2", "b"], "--prompt-2 is not used by an SDXL refiner"),
        (["--model", "tiny-sdxl", "--switch-at", "0.5"], "--switch-at needs --refiner MODEL"),
        (["--model", "tiny-sdxl", "--refiner", "tiny-sdxl-refiner", "--switch-at", "1.5"], r"in \(0, 1\).*got 1.5"),
        (["--model", "tiny-sdxl", "--refiner", "tiny"], "--refiner: 'tiny' is not an SDXL model"),
        (["--model", "tiny-sdxl-refiner", "--refiner", "tiny-sdxl"], "is an SDXL refiner itself"),
        (["--model", "tiny-sdxl", "--refiner", "no-such-refiner"], "'no-such-refiner' is neither"),
    ],
)
def test_bad_sdxl_options_are_refused_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    import stablediff.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("a refused run loaded a model"))
    code, _, err = run(capsys, "generate", "a", *argv, "--out", str(tmp_path / "o"))
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--original-size", "64"), ("--target-size", "0x64"), ("--crops", "-1,2"), ("--crops", "1x2")]
)
def test_malformed_sizes_name_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "a", "--model", "tiny-sdxl", f"{flag}={value}"])
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err and repr(value) in err


def test_refiner_is_refused_with_a_prompt_list(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code, _, err = run(capsys, "generate", "--prompts", str(prompts), "--model", "tiny-sdxl", "--refiner", "x")
    assert code == 2 and "--refiner and --switch-at take one generation" in err


def test_a1111_refiner_text_is_read_and_a_bad_record_refused(tmp_path):
    text = (
        "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 1024x1024, "
        "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.10.1"
    )
    _, unmapped = GenerationParams.read_a1111(text)
    assert (
        "Refiner: sd_xl_refiner_1.0 [7440042bbd] (models are not looked up by name; pass --refiner FILE "
        "--switch-at 0.8)" in unmapped
    )
    written = GenerationParams("a").to_a1111(refiner={"model": "r", "model_hash": "0123456789", "switch_at": 0.75})
    assert "Refiner: r [0123456789], Refiner switch at: 0.75, Version:" in written
    good = GenerationParams("a").to_record("m", "m", None)
    assert GenerationParams.from_record(good, "x.png")[1]["refiner"] is None  # and older records lack the key
    for bad in ({"model_file": "r.safetensors", "switch_at": 1.0}, {"model_file": 3, "switch_at": 0.5}, "r"):
        with pytest.raises(BadFileError, match="x.png: the stablediff chunk's 'refiner'"):
            GenerationParams.from_record({**good, "refiner": bad}, "x.png")


# ---- memory ----------------------------------------------------------------------------------


def test_memory_counts_the_second_tower_and_the_refiner(capsys):
    pipe = load_pipeline("tiny-sdxl")
    assert weight_bytes(pipe.spec, 4) == sum(
        t.numel() * 4 for net in pipe.networks() for t in net.state_dict().values()
    )  # both text towers
    sdxl, refiner = PRESETS["sdxl"], PRESETS["sdxl-refiner"]
    assert weight_bytes(sdxl, 2) == pytest.approx(6.94e9, rel=0.02)  # 2.57G + 84M + 123M + 695M parameters
    params = GenerationParams("a", width=1024, height=1024)
    alone = estimate_generation(sdxl, params, torch.float16, available=1000 * GIB)
    both = estimate_generation(sdxl, params, torch.float16, available=1000 * GIB, refiner=refiner)
    assert both.weights == alone.weights + weight_bytes(refiner, 2)
    assert both.stages["refiner U-Net"] > 0 and both.stages["refiner text encoder"] > 0
    code = main(["generate", "a", "--model", "sdxl", "--refiner", "sdxl-refiner", "--dtype", "fp16", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "refiner U-Net activations:" in out
    assert f"{both.weights / GIB:8.2f} GiB" in out
