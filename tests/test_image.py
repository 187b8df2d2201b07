"""Image loading robustness, tensor conversions equal to diffusers', PNG metadata files."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff.image import (
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    read_png_metadata,
    resize_for_model,
    save_png,
    tensor_to_images,
    unique_path,
)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: list[bytes]) -> bytes:
    """A minimal PNG written by hand, for formats PIL cannot write (16-bit RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in raw_rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# ---- loading ------------------------------------------------------------------------------------


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays
    rgba.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and pixels(out).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (0, 128))  # half-transparent black over white -> mid grey
    out = load_image(la)
    assert out.mode == "RGB" and pixels(out)[0, 0].tolist() == [255] * 3
    assert 126 <= pixels(out)[0, 1, 0] <= 128


def test_grayscale_and_one_bit_become_rgb(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "g.png")
    out = load_image(str(tmp_path / "g.png"))
    assert out.mode == "RGB" and out.size == (3, 2) and (pixels(out) == 77).all()
    out = load_image(Image.new("1", (2, 2), 1))
    assert out.mode == "RGB" and (pixels(out) == 255).all()


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    assert pixels(load_image(tmp_path / "p.png")).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    pal.save(tmp_path / "pt.png", transparency=0)  # palette entry 0 transparent -> white
    img = Image.open(tmp_path / "pt.png")
    assert img.mode == "P" and "transparency" in img.info
    assert pixels(load_image(tmp_path / "pt.png")).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768, 257, 0]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # PIL's convert("L") would clip these
    out = load_image(tmp_path / "g16.png")
    assert out.mode == "RGB" and pixels(out)[0, :, 0].tolist() == [255, 128, 1, 0]
    assert pixels(load_mask(tmp_path / "g16.png")).tolist() == [[255, 128, 1, 0]]
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert pixels(load_image(big_endian))[0, :, 0].tolist() == [255, 128, 1, 0]
    assert pixels(load_image(Image.fromarray(values.astype(np.int32))))[0, :, 0].tolist() == [255, 128, 1, 0]


def test_sixteen_bit_rgb_png(tmp_path):
    row = np.array([[65535, 32768, 0], [0, 65535, 0]], dtype=">u2").tobytes()
    (tmp_path / "rgb16.png").write_bytes(png_bytes(2, 1, 16, 2, [row]))
    out = load_image(tmp_path / "rgb16.png")  # PIL keeps the high byte of each sample
    assert out.mode == "RGB" and pixels(out).tolist() == [[[255, 128, 0], [0, 255, 0]]]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    r, g, b = pixels(load_image(tmp_path / "c.jpg"))[8, 8].tolist()
    assert r > 240 and g < 15 and b < 15  # cyan-free, full magenta+yellow = red


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (32, 64)  # transposed
    assert pixels(out)[8, 16, 0] > 200 and pixels(out)[56, 16, 2] > 200  # red on top, blue below
    assert load_mask(tmp_path / "rot.jpg").size == (32, 64)


@pytest.mark.parametrize("loader", [load_image, load_mask])
def test_bad_files_name_the_path_and_the_problem(tmp_path, loader):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    data = good.read_bytes()
    cases = {
        "missing.png": (None, "image file not found"),
        "empty.png": (b"", r"image file is empty \(0 bytes\)"),
        "notes.txt": (b"just some text\n", "not an image file"),
        "truncated.png": (data[: len(data) // 2], "corrupt or truncated image file"),
        "garbled.png": (data[:40] + bytes(range(256)) * 4, "corrupt or truncated image file"),
        "bad-header.png": (data[:8] + b"\x00" * 200, r"corrupt or truncated image file.*a PNG file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=message) as info:
            loader(path)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="not a file"):
        loader(tmp_path)
    with pytest.raises(TypeError, match="expected a PIL image or a path"):
        loader(42)


def test_load_mask_modes():
    brush = Image.new("RGBA", (2, 1), (255, 255, 255, 0))  # transparent white -> keep (black)
    brush.putpixel((1, 0), (255, 255, 255, 255))
    assert pixels(load_mask(brush)).tolist() == [[0, 255]]
    rgb = Image.new("RGB", (1, 1), (255, 0, 0))
    assert load_mask(rgb).mode == "L" and pixels(load_mask(rgb)).tolist() == [[76]]  # 601 luminance


# ---- tensors: equal to diffusers' VaeImageProcessor ----------------------------------------------


@pytest.fixture(scope="module")
def processors():
    from diffusers import image_processor as vip

    image = vip.VaeImageProcessor(vae_scale_factor=8)
    mask = vip.VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )  # as in the SD inpaint pipeline
    return image, mask


def random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def test_tensor_to_images_equals_diffusers(processors):
    image_proc, _ = processors
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(2, 3, 24, 40, generator=gen) * 0.8).to(dtype)  # some values beyond [-1, 1]
        x[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255, -1 / 255], dtype=dtype)  # rounding edges
        ours = tensor_to_images(x)
        ref = image_proc.postprocess(x, output_type="pil")
        assert len(ours) == 2 and all(o.mode == "RGB" and o.size == (40, 24) for o in ours)
        for a, b in zip(ours, ref, strict=True):
            assert np.array_equal(pixels(a), pixels(b)), dtype


def test_tensor_to_images_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected a \[B, 3, H, W\] image tensor, got \[3, 8, 8\]"):
        tensor_to_images(torch.zeros(3, 8, 8))
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        tensor_to_images(x)


def test_image_to_tensor_equals_diffusers_preprocess(processors):
    image_proc, _ = processors
    img = random_image("RGB", (50, 37), 1)
    ours = image_to_tensor(resize_for_model(img, 64, 48))
    ref = image_proc.preprocess(img, height=48, width=64)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 48, 64)
    assert torch.equal(ours, ref)
    assert ours.min() >= -1 and ours.max() <= 1
    assert torch.equal(image_to_tensor(img.convert("L")), image_to_tensor(img.convert("L").convert("RGB")))


def test_mask_to_tensor_equals_diffusers(processors):
    _, mask_proc = processors
    for mode, seed in (("L", 2), ("RGB", 3)):
        mask = random_image(mode, (30, 21), seed)
        ours = mask_to_tensor(mask, 40, 32)
        ref = mask_proc.preprocess(mask, height=32, width=40)
        assert ours.shape == (1, 1, 32, 40) and torch.equal(ours, ref), mode
        assert set(ours.unique().tolist()) <= {0.0, 1.0}
    brush = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert mask_to_tensor(brush, 8, 8).sum() == 0  # transparent = keep


# ---- PNG files ----------------------------------------------------------------------------------

PARAMS_TEXT = "a cat, 猫\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size: 8x8"
PARAMS_JSON = {"prompt": "a cat, 猫", "seed": 2**64 - 1, "guidance_scale": 7.5, "init_image": None}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_png_metadata_round_trip(tmp_path):
    img = random_image("RGB", (8, 8), 4)
    path = save_png(img, tmp_path / "out.png", PARAMS_TEXT, PARAMS_JSON)
    assert path == tmp_path / "out.png" and leftovers(tmp_path) == []
    assert read_png_metadata(path) == {"parameters": PARAMS_TEXT, "stablediff": PARAMS_JSON}
    with Image.open(path) as back:  # what A1111's "PNG Info" reads
        assert back.text["parameters"] == PARAMS_TEXT
        assert np.array_equal(pixels(back), pixels(img))
    latin = save_png(img, tmp_path / "latin.png", "a cat\nSteps: 1, Seed: 2, Size: 8x8", {})
    assert read_png_metadata(latin) == {"parameters": "a cat\nSteps: 1, Seed: 2, Size: 8x8", "stablediff": {}}
    mode = os.stat(path).st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # an ordinary file, not mkstemp's 0o600


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_metadata_of_other_files(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png") == {"parameters": None, "stablediff": None}
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="is a JPEG file, not a PNG"):
        read_png_metadata(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="image file not found"):
        read_png_metadata(tmp_path / "nope.png")


def test_overwrite_is_refused(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_png(Image.new("RGB", (4, 4)), target, "p", {})
    assert target.read_bytes() == b"precious" and leftovers(tmp_path) == []
    save_png(Image.new("RGB", (4, 4)), target, "p", {}, overwrite=True)
    assert read_png_metadata(target)["parameters"] == "p" and leftovers(tmp_path) == []


def test_unwritable_folders_leave_nothing(tmp_path, monkeypatch):
    img = Image.new("RGB", (4, 4))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{a_file} is not a folder"):
        save_png(img, a_file / "out.png", "p", {})
    with pytest.raises(FileNotFoundError, match=f"folder {tmp_path / 'missing'} does not exist"):
        save_png(img, tmp_path / "missing" / "out.png", "p", {})
    with pytest.raises(TypeError):  # not JSON: fails before anything is written
        save_png(img, tmp_path / "out.png", "p", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    # A read-only folder, simulated: tests run as root here, where chmod 0o555 blocks nothing.
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", refuse)
        with pytest.raises(PermissionError, match=f"folder {tmp_path} is not writable"):
            save_png(img, tmp_path / "out.png", "p", {})

    # The rename fails after the temp file is written: the temp file must be removed.
    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    for overwrite in (True, False):
        with monkeypatch.context() as m:
            m.setattr(os, "replace", fail)
            m.setattr(os, "link", fail)  # overwrite=False links (no clobber), falls back to replace
            with pytest.raises(PermissionError):
                save_png(img, tmp_path / "out.png", "p", {}, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _as_unprivileged_user(fn) -> None:
    """Run fn in a child process; as root (which ignores permissions) the child drops to nobody."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the check in the child process failed"


def test_real_read_only_folder():
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # not under pytest's 0700 tmp root: nobody must reach it
    folder = top / "ro"
    folder.mkdir()
    top.chmod(0o755)
    folder.chmod(0o555)

    def check():
        with pytest.raises(PermissionError, match=f"folder {folder} is not writable"):
            save_png(Image.new("RGB", (4, 4)), folder / "out.png", "p", {})

    try:
        _as_unprivileged_user(check)
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(top)


def test_unique_path(tmp_path):
    assert unique_path(tmp_path, "42") == tmp_path / "00000-42.png"
    (tmp_path / "00003-1.png").touch()
    (tmp_path / "00007-x.png").touch()
    (tmp_path / "notes.txt").touch()
    first = unique_path(tmp_path, "42")
    assert first == tmp_path / "00008-42.png"
    first.touch()
    assert unique_path(tmp_path, "42") == tmp_path / "00009-42.png"
    assert unique_path(tmp_path, "") == tmp_path / "00009.png"
    assert unique_path(tmp_path / "not-yet", "5") == tmp_path / "not-yet" / "00000-5.png"
    with pytest.raises(ValueError, match="without folders"):
        unique_path(tmp_path, "../evil")
