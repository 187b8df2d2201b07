"""The command line, and the generation guarantees it exposes: reproducible seeds, batches, PNG
metadata, and bad input that fails with a clear message and writes nothing."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff.cli import main
from stablediff.image import read_png_metadata
from stablediff.loading import load_pipeline
from stablediff.params import GenerationParams

SMALL = ["--width", "64", "--height", "64", "--steps", "4"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_info_and_reproduce_from_png(tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "generate",
        "a red circle",
        *SMALL,
        "--seed",
        "7",
        "--batch",
        "4",
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "a"),
    )
    assert code == 0
    paths = out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000-7.png", "00001-8.png", "00002-9.png", "00003-10.png"]
    meta = read_png_metadata(paths[2])
    assert meta["parameters"].startswith("a red circle\nSteps: 4, Sampler: DPM++ 2M")
    assert "Seed: 9" in meta["parameters"]
    assert meta["stablediff"]["params"]["seed"] == 9 and meta["stablediff"]["version"]

    # image k of a batch of 4 equals a batch of one with seed + k, bit for bit
    code, out, _ = run(capsys, "generate", "--from", paths[2], "--out", str(tmp_path / "b"))
    assert code == 0
    assert np.array_equal(pixels(paths[2]), pixels(out.strip()))

    code, out, _ = run(capsys, "info", paths[0])
    assert code == 0 and "Seed: 7" in out and '"seed": 7' in out


def test_same_seed_same_pixels_twice():
    pipe = load_pipeline("tiny")
    params = GenerationParams("a blue star", width=64, height=64, steps=5, sampler="euler_a", seed=123)
    first, second = pipe.generate(params)[0], pipe.generate(params)[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = pipe.generate(GenerationParams(**{**params.__dict__, "seed": 124}))[0]
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_default_size_is_the_models_own(tmp_path, capsys):
    """Without a width/height the API and the command line both draw at the model's own size (64 for
    `tiny`) and record that size; an explicit size wins."""
    pipe = load_pipeline("tiny")
    params = GenerationParams("a red circle", steps=2)
    assert (params.width, params.height) == (None, None)
    image = pipe.generate(params)[0]
    used = pipe.resolve_params(params)
    assert image.size == (64, 64) == (used.width, used.height) == (pipe.spec.default_size,) * 2
    assert "Size: 64x64" in used.to_a1111() and used.to_json_dict()["width"] == 64
    assert (params.width, params.height) == (None, None)  # the caller's params are not changed

    code, out, _ = run(
        capsys,
        "generate",
        "a red circle",
        "--steps",
        "2",
        "--seed",
        "0",
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "cli"),
    )
    assert code == 0
    meta = read_png_metadata(out.strip())
    assert Image.open(out.strip()).size == (64, 64) and "Size: 64x64" in meta["parameters"]
    assert (meta["stablediff"]["params"]["width"], meta["stablediff"]["params"]["height"]) == (64, 64)
    assert np.array_equal(pixels(out.strip()), np.asarray(image))  # the same image as the API's

    assert pipe.generate(GenerationParams("a red circle", width=48, height=32, steps=2))[0].size == (48, 32)
    assert pipe.generate(GenerationParams("a red circle", width=48, steps=2))[0].size == (48, 64)
    code, out, _ = run(
        capsys,
        "generate",
        "a red circle",
        "--steps",
        "2",
        "--width",
        "32",
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "cli"),
    )
    assert code == 0 and Image.open(out.strip()).size == (32, 64)
    assert "Size: 32x64" in read_png_metadata(out.strip())["parameters"]


def test_img2img_default_size_is_the_models_not_the_init_images():
    pipe = load_pipeline("tiny")
    init = Image.new("RGB", (32, 48), "red")
    assert pipe.generate(GenerationParams("x", steps=2, init_image=init))[0].size == (64, 64)
    assert pipe.generate(GenerationParams("x", steps=2, init_image=init, width=40, height=24))[0].size == (40, 24)


def test_never_overwrites(tmp_path, capsys):
    out_dir = tmp_path / "o"
    for _ in range(2):
        assert run(capsys, "generate", "x", *SMALL, "--seed", "1", "--model", "tiny", "--out", str(out_dir))[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["00000-1.png", "00001-1.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "60"], "width must be a positive multiple of 8, got 60"),
        (["--height", "0"], "height must be a positive multiple of 8, got 0"),
        (["--steps", "0"], "steps must be an int >= 1, got 0"),
        (["--cfg", "nan"], "guidance_scale must be a finite number, got (nan|inf)"),
        (["--cfg", "inf"], "guidance_scale must be a finite number, got (nan|inf)"),
        (["--sampler", "magic"], "unknown sampler 'magic'.*ddim"),
    ],
)
def test_bad_input_clear_error_and_no_file(tmp_path, capsys, args, message):
    out_dir = tmp_path / "o"
    code, _, err = run(capsys, "generate", "x", "--model", "tiny", "--out", str(out_dir), *args)
    assert code == 2
    assert __import__("re").search(message, err), err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_img2img_strength_errors(tmp_path, capsys):
    init = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(init)
    for strength, message in (("1.5", "strength must be in"), ("0.01", "leaves zero steps")):
        code, _, err = run(
            capsys,
            "img2img",
            "x",
            "--init",
            str(init),
            "--strength",
            strength,
            *SMALL,
            "--model",
            "tiny",
            "--out",
            str(tmp_path / "o"),
        )
        assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_inpaint_mask_size_and_bad_images(tmp_path, capsys):
    init, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), "red").save(init)
    Image.new("L", (32, 32), 255).save(mask)
    code, _, err = run(
        capsys,
        "inpaint",
        "x",
        "--init",
        str(init),
        "--mask",
        str(mask),
        *SMALL,
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "mask size 32x32 differs from the image size 64x64" in err, err
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(init.read_bytes()[:60])
    for bad, message in (("empty.png", "empty"), ("corrupt.png", "corrupt or truncated")):
        code, _, err = run(
            capsys,
            "img2img",
            "x",
            "--init",
            str(tmp_path / bad),
            *SMALL,
            "--model",
            "tiny",
            "--out",
            str(tmp_path / "o"),
        )
        assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@contextlib.contextmanager
def read_only(folder):
    """Make `folder` really read-only: chmod for ordinary users; root ignores permissions, so
    for root the folder is made immutable (chattr +i, which root cannot write through either)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        undo = ["chattr", "-i", str(folder)]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


def test_read_only_output_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        code, _, err = run(capsys, "generate", "x", *SMALL, "--model", "tiny", "--out", str(ro))
        assert code == 2 and f"output folder {ro} is not writable" in err, err
        code, _, err = run(capsys, "generate", "x", *SMALL, "--model", "tiny", "--out", str(ro / "sub"))
        assert code == 2 and f"cannot create output folder {ro / 'sub'}" in err, err
    assert list(ro.iterdir()) == []


def test_convert_round_trip(tmp_path, capsys):
    from stablediff.loading import save
    from stablediff.weights.io import read_state_dict

    src = save(load_pipeline("tiny", seed=4), tmp_path / "m.safetensors")
    assert run(capsys, "convert", str(src), str(tmp_path / "d"), "--layout", "diffusers")[0] == 0
    assert run(capsys, "convert", str(tmp_path / "d"), str(tmp_path / "h.safetensors"), "--dtype", "fp16")[0] == 0
    half, full = read_state_dict(tmp_path / "h.safetensors"), read_state_dict(src)
    assert set(half) == set(full)
    for k, v in full.items():
        assert half[k].dtype == torch.float16 and torch.equal(v.half(), half[k]), k
    code, _, err = run(capsys, "convert", str(src), str(tmp_path / "h.safetensors"))
    assert code == 2 and "exists" in err


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "stablediff", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "examples:" in result.stdout and "--sampler" in result.stdout


def test_dataset_shapes_command(tmp_path, capsys):
    from stablediff.train.data import CaptionedFolder

    code, out, _ = run(capsys, "dataset", "shapes", "--n", "6", "--out", str(tmp_path / "shapes"), "--seed", "3")
    assert code == 0 and out.strip() == str(tmp_path / "shapes")
    data = CaptionedFolder(tmp_path / "shapes", size=64)
    assert len(data) == 6 and data[0][0].shape == (3, 64, 64) and data[0][1]
    code, _, err = run(capsys, "dataset", "shapes", "--n", "0", "--out", str(tmp_path / "none"))
    assert code == 2 and "--n must be >= 1" in err and not (tmp_path / "none").exists()


def test_eval_command_small_suite(tmp_path, capsys):
    import json

    code, out, _ = run(
        capsys,
        "eval",
        "--model",
        "tiny",
        "--n",
        "2",
        "--steps",
        "3",
        "--suites",
        "single,relation",
        "--out",
        str(tmp_path / "ev"),
    )
    assert code == 0 and "judge" in out.lower()
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(result["suites"]) == {"single", "relation"}
    assert result["settings"]["steps"] == 3 and result["judge"]["clean"]["overall"] >= 0.99


def test_train_commands_end_to_end(tmp_path, capsys):
    """tokenizer -> vae -> text -> unet from the command line on the tiny sizes; the exported model
    generates; --resume continues; bad options are refused before anything is written."""
    common = ["--data", "shapes", "--shapes_size=64", "--resolution=32", "--eval_size=8", "--log_every=1"]
    assert run(capsys, "train", "tokenizer", *common, "--out", str(tmp_path / "tok"), "--vocab_size=560")[0] == 0
    tok = str(tmp_path / "tok")
    for stage in ("vae", "text"):
        code, out, err = run(
            capsys,
            "train",
            stage,
            *common,
            "--out",
            str(tmp_path / stage),
            "--model=tiny",
            "--steps=2",
            "--batch_size=4",
            f"--tokenizer={tok}",
        )
        assert code == 0, err
    unet = [
        "train",
        "unet",
        *common,
        "--out",
        str(tmp_path / "unet"),
        "--model=tiny",
        "--steps=4",
        "--batch_size=4",
        f"--vae={tmp_path / 'vae'}",
        f"--text={tmp_path / 'text'}",
        "--save_every=2",
    ]
    code, out, err = run(capsys, *unet)
    assert code == 0, err
    model = out.strip().splitlines()[-1]
    pipe = load_pipeline(model)
    assert pipe.tokenizer.vocab_size <= 560
    image = pipe.generate(GenerationParams("a red circle", width=32, height=32, steps=3, seed=0))[0]
    assert image.size == (32, 32)
    # resuming a finished run with more steps continues from its last checkpoint
    code, _, err = run(capsys, *[a if a != "--steps=4" else "--steps=6" for a in unet], "--resume")
    assert code == 0, err
    code, _, err = run(capsys, "train", "unet", *common, "--out", str(tmp_path / "bad"), "--lr=fast")
    assert code == 2 and "--lr='fast': expected float" in err and not (tmp_path / "bad").exists()


def test_train_strict_stops_at_a_bad_file(tmp_path, capsys):
    from stablediff.shapes import write_shapes_folder

    folder = write_shapes_folder(tmp_path / "data", 6, seed=1)
    (folder / "zz-broken.png").write_bytes(b"not an image at all")
    (folder / "metadata.jsonl").unlink()  # read the image/.txt pairs, where the broken file is listed
    (folder / "zz-broken.txt").write_text("a broken file")
    code, _, err = run(
        capsys,
        "train",
        "tokenizer",
        "--data",
        str(folder),
        "--out",
        str(tmp_path / "t"),
        "--vocab_size=560",
        "--strict=true",
    )
    assert code == 2 and "zz-broken.png" in err, err
    assert not (tmp_path / "t").exists()
    code, _, err = run(
        capsys, "train", "tokenizer", "--data", str(folder), "--out", str(tmp_path / "t"), "--vocab_size=560"
    )
    assert code == 0, err
