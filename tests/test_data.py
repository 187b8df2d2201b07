"""Captioned folders (layouts, transforms, the bad-files policy) and latent caches."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset

from stablediff.image import image_to_tensor
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.shapes import ShapesDataset
from stablediff.train.data import CaptionedFolder, LatentCacheDataset, ShapesPairs, encode_latent_cache
from stablediff.weights.io import write_safetensors


def _image(w: int = 24, h: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def _pair(folder, stem: str, img: Image.Image | bytes, text: str | None = "a caption", suffix: str = ".png"):
    path = folder / f"{stem}{suffix}"
    path.write_bytes(img if isinstance(img, bytes) else _png_bytes(img, "JPEG" if suffix == ".jpg" else "PNG"))
    if text is not None:
        (folder / f"{stem}.txt").write_text(text)
    return path


def _good_folder(tmp_path, n: int = 3):
    for i in range(n):
        _pair(tmp_path, f"good{i}", _image(seed=i), f"caption {i}")
    return tmp_path


def test_reads_pairs_as_tensors(tmp_path):
    _good_folder(tmp_path)
    (tmp_path / "sub").mkdir()
    _pair(tmp_path / "sub", "nested", _image(40, 20), "wide", suffix=".jpg")
    ds = CaptionedFolder(tmp_path, size=16)
    assert len(ds) == 4 and not ds.skipped
    captions = [ds[i][1] for i in range(len(ds))]
    assert captions == ["caption 0", "caption 1", "caption 2", "wide"]  # sorted by path
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_center_crop_of_a_resized_image(tmp_path):
    img = _image(48, 24)
    _pair(tmp_path, "wide", img, "wide")
    x, _ = CaptionedFolder(tmp_path, size=12)[0]
    expected = img.resize((24, 12), Image.Resampling.LANCZOS).crop((6, 0, 18, 12))
    assert torch.equal(x, image_to_tensor(expected)[0])


def test_random_crop_flip_and_dropout_are_seeded(tmp_path):
    for i in range(40):
        _pair(tmp_path, f"{i:02d}", _image(32, 20, seed=i), f"c{i}")
    kwargs = dict(size=16, crop="random", flip=True, caption_dropout=0.5, seed=3, verify="header")
    a, b = CaptionedFolder(tmp_path, **kwargs), CaptionedFolder(tmp_path, **kwargs)
    items_a = [a[i] for i in range(40)]
    for i in reversed(range(40)):
        x, text = b[i]
        assert torch.equal(x, items_a[i][0]) and text == items_a[i][1]
    dropped = sum(text == "" for _, text in items_a)
    assert 8 <= dropped <= 32
    a.set_epoch(1)
    assert any(not torch.equal(a[i][0], items_a[i][0]) for i in range(40))
    assert any(CaptionedFolder(tmp_path, **{**kwargs, "seed": 4})[i][1] != items_a[i][1] for i in range(40))
    # flips: some item equals the mirror of its unflipped random crop
    plain = CaptionedFolder(tmp_path, **{**kwargs, "flip": False})
    assert any(torch.equal(items_a[i][0], plain[i][0].flip(-1)) for i in range(40))
    assert any(torch.equal(items_a[i][0], plain[i][0]) for i in range(40))


def test_metadata_jsonl_layout(tmp_path):
    _image(seed=1).save(tmp_path / "a.png")
    _image(seed=2).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("ignored: metadata wins")
    lines = [
        json.dumps({"file_name": "a.png", "text": "first"}),
        "",
        json.dumps({"file": "b.png", "text": "second"}),
        "{not json",
        json.dumps({"file_name": "c.png", "text": "missing"}),
        json.dumps({"file_name": "../x.png", "text": "outside"}),
        json.dumps({"file_name": "a.png"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    ds = CaptionedFolder(tmp_path, size=8)
    assert [ds[i][1] for i in range(len(ds))] == ["first", "second"]
    reasons = [r for _, r in ds.skipped]
    assert len(reasons) == 4
    assert "not JSON" in reasons[0] and "does not exist" in reasons[1] and "outside" in reasons[2]
    assert '"text"' in reasons[3]


def _bad_files(folder) -> dict[str, str]:
    """stem -> the reason (a substring) for which it must be skipped."""
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.txt").write_text("x")
    _pair(folder, "text", b"this is not an image at all")
    _pair(folder, "truncated", _png_bytes(_image(64, 64))[:300])
    _pair(folder, "tiny", Image.new("RGB", (1, 1), "red"))
    _pair(folder, "thin", Image.new("RGB", (40, 7), "red"))
    _pair(folder, "nocaption", _image(), text=None)
    _pair(folder, "latin1", _image())
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return {
        "empty": "empty file (0 bytes)",
        "text": "not an image",
        "truncated": "corrupt or truncated",
        "tiny": "image too small (1x1",
        "thin": "image too small (40x7",
        "nocaption": "missing caption file",
        "latin1": "not UTF-8",
    }


def test_bad_files_are_skipped_counted_and_logged(tmp_path, caplog):
    _good_folder(tmp_path, 2)
    expected = _bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stablediff.train.data.folder"):
        ds = CaptionedFolder(tmp_path, size=8)
    assert len(ds) == 2
    got = {path.stem: reason for path, reason in ds.skipped}
    assert set(got) == set(expected)
    for stem, reason in expected.items():
        assert reason in got[stem], (stem, got[stem])
        assert any(stem in rec.getMessage() and reason in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("stem", ["empty", "text", "truncated", "tiny", "thin", "nocaption", "latin1"])
def test_strict_raises_naming_path_and_reason(tmp_path, stem):
    expected = _bad_files(tmp_path)
    for other in expected:  # keep only the one bad file under test
        if other != stem:
            for path in tmp_path.glob(f"{other}.*"):
                path.unlink()
    _good_folder(tmp_path, 1)
    with pytest.raises(ValueError, match="bad training file") as err:
        CaptionedFolder(tmp_path, strict=True)
    assert str(tmp_path / f"{stem}.png") in str(err.value) and expected[stem] in str(err.value)


def test_conversions_rgba_16bit_grayscale(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    _pair(tmp_path, "a_rgba", Image.fromarray(rgba, "RGBA"))
    sixteen = np.full((16, 16), 32896, dtype=np.uint16)  # 32896 / 257 = 128: clipping would give 255
    _pair(tmp_path, "b_16bit", Image.fromarray(sixteen))
    _pair(tmp_path, "c_gray", Image.fromarray(np.full((16, 16), 64, dtype=np.uint8), "L"))
    ds = CaptionedFolder(tmp_path, size=16, strict=True)
    to_uint8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    rgba_x, sixteen_x, gray_x = (to_uint8(ds[i][0]) for i in range(3))
    assert rgba_x[:, :, :8].reshape(3, -1).unique(dim=1).tolist() == [[255], [0], [0]]
    assert (rgba_x[:, :, 8:] == 255).all()  # composited onto white
    assert (sixteen_x == 128).all()
    assert gray_x.shape == (3, 16, 16) and (gray_x == 64).all()


def test_header_verify_defers_truncation_to_getitem(tmp_path):
    _pair(tmp_path, "a", _image(32, 32, seed=1), "first")
    _pair(tmp_path, "b", _png_bytes(_image(64, 64), "JPEG")[:-400], "broken", suffix=".jpg")
    _pair(tmp_path, "c", _image(32, 32, seed=2), "third")
    ds = CaptionedFolder(tmp_path, size=8, verify="header")
    assert len(ds) == 3 and not ds.skipped
    x, text = ds[1]  # replaced by the next good item
    assert text == "third" and x.shape == (3, 8, 8)
    assert len(ds.skipped) == 1 and "failed to decode" in ds.skipped[0][1]
    ds[1]
    assert len(ds.skipped) == 1  # logged once
    with pytest.raises(ValueError, match=r"b\.jpg"):
        CaptionedFolder(tmp_path, size=8, verify="header", strict=True)[1]
    full = CaptionedFolder(tmp_path, size=8)
    assert len(full) == 2 and "corrupt or truncated" in full.skipped[0][1]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match=f"data folder {tmp_path / 'nope'} does not exist"):
        CaptionedFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"data folder {tmp_path / 'empty'} has no usable captioned images"):
        CaptionedFolder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    _pair(tmp_path / "bad", "x", b"")
    with pytest.raises(ValueError, match=r"has no usable captioned images \(1 skipped"):
        CaptionedFolder(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"crop must be one of \['center', 'random'\]"):
        CaptionedFolder(tmp_path, crop="left")


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8))


def test_latent_cache_round_trip(tmp_path):
    vae = _tiny_vae()
    shapes = ShapesDataset(5, seed=1, size=32)
    out = encode_latent_cache(shapes, vae, tmp_path / "cache.safetensors", batch_size=2)
    assert vae.training  # mode restored
    with torch.no_grad():
        posterior = vae.eval().encode(torch.stack([image_to_tensor(shapes[i][0])[0] for i in range(5)]))
    cache = LatentCacheDataset(out, seed=7, sample=False)
    assert len(cache) == 5 and cache.latent_shape == (4, 16, 16)
    assert torch.allclose(cache.mean, posterior.mean, atol=1e-5) and torch.allclose(cache.std, posterior.std, atol=1e-5)
    assert [cache[i][1] for i in range(5)] == [shapes[i][1] for i in range(5)]
    assert torch.equal(cache[2][0], cache.mean[2])
    assert json.loads(cache.metadata["image_size"]) == [32, 32]

    sampled = LatentCacheDataset(out, seed=7)
    z = sampled[3][0]
    assert torch.equal(z, LatentCacheDataset(out, seed=7)[3][0]) and not torch.equal(z, cache.mean[3])
    assert torch.allclose(z, posterior.mean[3], atol=1e-4 + 6 * posterior.std[3].max().item())
    sampled.set_epoch(1)
    assert not torch.equal(sampled[3][0], z)

    dropped = LatentCacheDataset(out, caption_dropout=1.0)
    assert all(dropped[i][1] == "" for i in range(5))


def test_latent_cache_prefix_extends_a_cache(tmp_path):
    vae = _tiny_vae()
    first, more = ShapesPairs(3, 1, 32, regions=True), ShapesPairs(2, 2, 32, regions=True, n_objects=2)
    prefix = encode_latent_cache(first, vae, tmp_path / "first.safetensors")
    extended = LatentCacheDataset(
        encode_latent_cache(more, vae, tmp_path / "both.safetensors", prefix=prefix), sample=False, regions=True
    )
    whole_path = encode_latent_cache(ConcatDataset([first, more]), vae, tmp_path / "whole.safetensors")
    whole = LatentCacheDataset(whole_path, sample=False, regions=True)
    assert len(extended) == 5 and extended.metadata["count"] == "5"
    print("max |mean difference|:", (extended.mean - whole.mean).abs().max().item())
    assert torch.allclose(extended.mean, whole.mean, atol=1e-5) and torch.allclose(extended.std, whole.std, atol=1e-5)
    assert extended.captions == whole.captions and extended.regions == whole.regions

    other = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8))
    with pytest.raises(ValueError, match="another VAE configuration"):
        encode_latent_cache(more, other, tmp_path / "bad.safetensors", prefix=prefix)
    with pytest.raises(ValueError, match=r"item 3 \(the prefix's 3 items first\) has no grounding regions"):
        encode_latent_cache(ShapesDataset(2, seed=2, size=32), vae, tmp_path / "bad.safetensors", prefix=prefix)
    assert not (tmp_path / "bad.safetensors").exists()


def test_latent_cache_errors_write_nothing(tmp_path):
    vae = _tiny_vae()
    (tmp_path / "imgs").mkdir()
    folder = _good_folder(tmp_path / "imgs", 2)
    with pytest.raises(ValueError, match="caption_dropout=0.0"):
        encode_latent_cache(CaptionedFolder(folder, size=16, caption_dropout=0.1), vae, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        encode_latent_cache(CaptionedFolder(folder, size=16), vae, tmp_path / "no" / "c.safetensors")
    with pytest.raises(ValueError, match="multiple of 2"):  # the VAE refuses odd sizes mid-way
        encode_latent_cache(CaptionedFolder(folder, size=15), vae, tmp_path / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
    write_safetensors({"w": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="is not a latent cache"):
        LatentCacheDataset(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        LatentCacheDataset(tmp_path / "missing.safetensors")
