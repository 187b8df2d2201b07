"""Aspect-ratio bucketing: the bucket shapes, a folder's items cut to their buckets, one bucket per
batch in the data order (with ranks and resumes), and a U-Net run on non-square batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff.train.config import TrainConfig
from stablediff.train.data.buckets import bucket_shapes, nearest_bucket
from stablediff.train.data.folder import CaptionedFolder
from stablediff.train.order import BucketBatches, Position, batch_order
from stablediff.train.stages.unet import UNetStage
from stablediff.train.trainer import train
from stablediff.weights.io import read_state_dict


@pytest.mark.parametrize(("resolution", "step", "max_aspect"), [(512, 64, 2.5), (768, 64, 2.0), (64, 8, 3.0)])
def test_bucket_shapes_fill_the_area_within_the_ratio(resolution, step, max_aspect):
    shapes = bucket_shapes(resolution, step, max_aspect)
    area = resolution * resolution
    assert (resolution, resolution) in shapes
    for w, h in shapes:
        assert w % step == 0 and h % step == 0
        assert w * h <= area and max(w / h, h / w) <= max_aspect
        assert max(w, h) == (area // min(w, h)) // step * step  # the longest side the short one allows
        assert (h, w) in shapes  # portrait and landscape alike
    ratios = [w / h for w, h in shapes]
    assert ratios == sorted(ratios, reverse=True)
    print(f"{resolution}/{step}/{max_aspect}: {shapes}")


def test_bucket_shapes_reject_bad_settings():
    with pytest.raises(ValueError, match="bucket_step"):
        bucket_shapes(512, 60)
    with pytest.raises(ValueError, match="exceed resolution"):
        bucket_shapes(64, 128)
    with pytest.raises(ValueError, match="bucket_max_aspect"):
        bucket_shapes(512, 64, 0.5)
    with pytest.raises(ValueError, match="buckets is for the U-Net stages"):
        TrainConfig(stage="vae", buckets=True)


def test_an_image_goes_to_the_bucket_nearest_its_ratio():
    shapes = bucket_shapes(512, 64)
    for width, height in [(1500, 1000), (1000, 1500), (1920, 1080), (800, 800), (3000, 1000)]:
        chosen = shapes[nearest_bucket(width, height, shapes)]
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
        assert all(abs(math.log(w / h) - math.log(width / height)) >= distance for w, h in shapes)
    assert shapes[nearest_bucket(800, 800, shapes)] == (512, 512)


def write_folder(root, sizes) -> None:
    rng = np.random.default_rng(0)
    root.mkdir()
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{k:02d}.png")
        (root / f"{k:02d}.txt").write_text(f"a picture {k}")


SIZES = [(48, 32)] * 4 + [(32, 48)] * 4 + [(40, 40)] * 4  # landscape, portrait, square


def test_folder_items_are_cut_to_their_bucket(tmp_path):
    write_folder(tmp_path / "data", SIZES)
    exif_image = Image.new("RGB", (48, 32))  # stored landscape, shown portrait (EXIF orientation 6)
    exif = exif_image.getexif()
    exif[0x0112] = 6
    exif_image.save(tmp_path / "data" / "99.jpg", exif=exif)
    (tmp_path / "data" / "99.txt").write_text("rotated")
    shapes = bucket_shapes(32, 8)
    folder = CaptionedFolder(tmp_path / "data", 32, buckets=shapes, crop="random")
    for i in range(len(folder)):
        image, _ = folder[i]
        width, height = shapes[folder.item_buckets[i]]
        assert image.shape == (3, height, width)
    got = [tuple(folder[i][0].shape[1:]) for i in range(len(folder))]
    assert got[:4] == [(24, 40)] * 4 and got[4:8] == [(40, 24)] * 4 and got[8:12] == [(32, 32)] * 4
    assert got[12] == (40, 24)  # portrait once upright
    square = CaptionedFolder(tmp_path / "data", 32)  # without buckets: square crops as before
    assert {tuple(square[i][0].shape[1:]) for i in range(len(square))} == {(32, 32)}


def test_bucket_batches_hold_one_bucket_and_cover_every_item():
    buckets = [0] * 5 + [1] * 3 + [2] * 9
    order = BucketBatches(buckets, batch_size=4, seed=3)
    assert order.epoch_size == 8 + 4 + 12
    stream = order.global_batches()
    for epoch in range(3):
        batches = [next(stream) for _ in range(order.epoch_size // 4)]
        for batch in batches:
            assert len(batch) == 4 and len({buckets[i] for _, i in batch}) == 1
            assert {e for e, _ in batch} == {epoch}
        assert {i for batch in batches for _, i in batch} == set(range(len(buckets)))
    assert order.epoch_batches(0) != order.epoch_batches(1)  # a new order every epoch


def test_bucket_batches_split_over_ranks_and_resume_where_they_stopped():
    buckets = [k % 3 for k in range(20)]
    one = BucketBatches(buckets, batch_size=4, seed=1).global_batches()
    two = [BucketBatches(buckets, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    streams = [iter(t) for t in two]
    for _ in range(10):
        batch = next(one)
        parts = [next(s) for s in streams]
        assert sorted(parts[0] + parts[1]) == sorted(batch)
    order = BucketBatches(buckets, batch_size=4, seed=1)
    full = order.global_batches()
    seen = [next(full) for _ in range(9)]
    later = BucketBatches(buckets, 4, seed=1, start=Position().advance(5 * 4, order.epoch_size)).global_batches()
    assert [next(later) for _ in range(4)] == seen[5:9]


def test_batch_order_finds_buckets_through_wrappers(tmp_path):
    write_folder(tmp_path / "data", SIZES)
    folder = CaptionedFolder(tmp_path / "data", 32, buckets=bucket_shapes(32, 8))
    subset = torch.utils.data.Subset(folder, [0, 5, 9])
    assert isinstance(batch_order(subset, 2, 0, 0, 1, Position()), BucketBatches)
    assert batch_order(subset, 2, 0, 0, 1, Position()).buckets == [folder.item_buckets[i] for i in (0, 5, 9)]
    plain = CaptionedFolder(tmp_path / "data", 32)
    assert not isinstance(batch_order(plain, 2, 0, 0, 1, Position()), BucketBatches)


class ShapeRecorder(UNetStage):
    sample_steps = 2
    shapes: list[tuple[int, ...]] = []

    def loss(self, model, batch, step, generator):
        ShapeRecorder.shapes.append(tuple(batch["x"].shape))
        return super().loss(model, batch, step, generator)


def test_unet_trains_on_bucketed_batches_and_resumes_exactly(tmp_path):
    write_folder(tmp_path / "data", SIZES * 2)
    common = dict(
        stage="unet",
        data=str(tmp_path / "data"),
        resolution=32,
        buckets=True,
        bucket_step=8,
        batch_size=2,
        steps=6,
        save_every=3,
        eval_every=0,
        eval_size=2,
        lr=1e-3,
        warmup_steps=1,
        seed=2,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ShapeRecorder.shapes = []
        train(ShapeRecorder, TrainConfig(out=str(tmp_path / "straight"), **common))
        shapes = ShapeRecorder.shapes
        assert len(set(shapes)) > 1 and all(len(s) == 4 for s in shapes), shapes  # non-square batches
        print("batch shapes:", shapes)
        split = TrainConfig(out=str(tmp_path / "split"), **common)
        train(ShapeRecorder, split, until=3)
        train(ShapeRecorder, split, resume="latest")
    finally:
        torch.set_num_threads(before)
    a = read_state_dict(tmp_path / "straight" / "checkpoints" / "step_0000006" / "model.safetensors")
    b = read_state_dict(tmp_path / "split" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_buckets_need_a_captioned_folder(tmp_path):
    config = TrainConfig(stage="unet", data="shapes", out=str(tmp_path / "run"), buckets=True, bucket_step=8)
    with pytest.raises(ValueError, match="buckets needs a captioned image folder"):
        train("unet", config)
    assert not (tmp_path / "run" / "checkpoints").exists()
