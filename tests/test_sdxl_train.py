"""The finetune and lora stages on SDXL, through the real trainer: a tiny SDXL base (the model of
test_sdxl_addons, written by diffusers' save_pretrained) and a tiny captioned folder of several
sizes made here, one intra-op thread.

What is checked: each image's original size and crop reach the U-Net as diffusers' SDXL script
computes them; the training conditioning equals the pipeline's for the same caption and sizes;
a dropped caption is dropped for both text encoders; loss falls; resuming is bit-exact; two
processes under torchrun equal one with twice the batch; the LoRA file has kohya's SDXL names and
gives the same outputs in ours and in diffusers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from PIL import Image
from test_sdxl_addons import _assert_matches, _fresh, _ours, _theirs, build_xl

from stablediff.loading import load_pipeline
from stablediff.models.unet import micro_conditioning
from stablediff.params import GenerationParams
from stablediff.train.config import TrainConfig
from stablediff.train.data import CaptionedFolder, ImageGeometry
from stablediff.train.stages.lora import LoraStage
from stablediff.train.stages.unet import FinetuneStage
from stablediff.train.trainer import train
from stablediff.weights.io import read_state_dict

CPU = torch.device("cpu")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
ATOL = 1e-5
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}
# (width, height): landscape, portrait, square, larger than the training size and smaller
SIZES = [(48, 32), (32, 48), (40, 40), (64, 48), (24, 24), (48, 32), (32, 48), (40, 40)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(diffusers' pipeline, the base folder, ours)."""
    return build_xl(tmp_path_factory.mktemp("sdxl_train"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two-colour pictures (top and bottom halves) of several sizes, captioned by their colours."""
    root = tmp_path_factory.mktemp("captioned") / "data"
    root.mkdir()
    names = list(COLOURS)
    for k, (w, h) in enumerate(SIZES):
        top, bottom = names[k % 4], names[(k + 1 + k // 4) % 4]
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
        pixels[: h // 2], pixels[h // 2 :] = COLOURS[top], COLOURS[bottom]
        Image.fromarray(pixels).save(root / f"{k:02d}.png")
        (root / f"{k:02d}.txt").write_text(f"{top} above {bottom}")
    return root


def config(stage: str, out: Path, base: Path, data: Path, **overrides) -> TrainConfig:
    values = dict(
        stage=stage,
        base=str(base),
        data=str(data),
        out=str(out),
        resolution=32,
        center_crop=False,
        flip=True,
        caption_dropout=0.2,
        batch_size=4,
        steps=12,
        lr=2e-3,
        warmup_steps=1,
        ema_decay=0.5,
        log_every=1,
        save_every=100,
        eval_every=0,
        eval_size=2,
        seed=3,
    )
    if stage == "lora":
        values.update(
            lr=1e-2, lora_targets="transformer", lora_rank=4, lora_alpha=2.0, lora_conv_rank=2, lora_text_encoder=True
        )
    return TrainConfig(**{**values, **overrides})


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "event" not in r and "lr" in r]


class FastFinetune(FinetuneStage):
    sample_steps = 2


class FastLora(LoraStage):
    sample_steps = 2
    built: list[LoraStage] = []

    def __init__(self, config, device):
        super().__init__(config, device)
        FastLora.built.append(self)


# ---------------------------------------------------------------------------------------------
# Conditioning


def test_folder_geometry_is_the_original_size_and_the_crop_as_seen(tmp_path):
    """Each item's ImageGeometry: the size before resizing (height, width), and where the crop's
    top-left corner is in the resized image as it is returned, mirrored or not."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 48 wide, 32 high
    (tmp_path / "d").mkdir()
    Image.fromarray(pixels).save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.txt").write_text("noise")
    folder = CaptionedFolder(tmp_path / "d", 16, crop="random", flip=True, geometry=True, seed=1)
    resized = Image.fromarray(pixels).resize((24, 16), Image.Resampling.LANCZOS)  # shorter side 16
    seen = set()
    for epoch in range(12):
        folder.set_epoch(epoch)
        image, caption, geometry = folder[0]
        assert caption == "noise" and isinstance(geometry, ImageGeometry) and geometry.original_size == (32, 48)
        top, left = geometry.crop_top_left
        assert top == 0 and 0 <= left <= 8
        expected = image.new_tensor(np.asarray(resized)).permute(2, 0, 1) / 127.5 - 1
        mirrored = expected.flip(-1)
        flipped = torch.allclose(image, mirrored[:, :, left : left + 16], atol=1e-6)
        assert flipped or torch.allclose(image, expected[:, :, left : left + 16], atol=1e-6)
        seen.add((left, flipped))
    assert len({f for _, f in seen}) == 2 and len({left for left, _ in seen}) > 2  # both cases were drawn
    assert len(CaptionedFolder(tmp_path / "d", 16)[0]) == 2  # without geometry: (image, caption) as before


@torch.no_grad()
def test_training_conditioning_is_the_pipelines(xl, data, tmp_path):
    """For a caption and an image's geometry, the context and y the U-Net trains on are exactly
    those the pipeline samples with for that prompt and those sizes (batches of one: bit for bit)."""
    stage = FinetuneStage(config("finetune", tmp_path / "run", xl[1], data, caption_dropout=0.0), CPU)
    items = [stage.dataset()[i] for i in range(3)]
    batch = stage.collate(items)
    assert batch["ids"].shape == batch["ids_2"].shape == (3, 77) and batch["time_ids"].shape == (3, 6)
    condition = stage._condition(batch)
    assert condition["context"].shape == (3, 77, 64) and condition["y"].shape == (3, 32 + 6 * 256)
    pipe = xl[2]
    for k, item in enumerate(items):
        image, caption, geometry = item
        target = tuple(image.shape[-2:])
        params = GenerationParams(
            caption, width=target[1], height=target[0], original_size=geometry.original_size,
            crops_coords_top_left=geometry.crop_top_left,
        )  # fmt: skip
        expected = pipe.encode_sdxl_prompt(params)
        ids, _ = pipe.sdxl_time_ids(params)
        assert batch["time_ids"][k].tolist() == [*geometry.original_size, *geometry.crop_top_left, *target]
        one = stage._condition(stage.collate([item]))
        assert torch.equal(one["context"], expected.context), caption
        assert torch.equal(one["y"], micro_conditioning(expected.pooled, ids)), caption
        diff = max(float((condition[n][k] - one[n][0]).abs().max()) for n in ("context", "y"))
        print(f"{caption!r}: batch of 3 vs batch of 1, max abs diff {diff:.2e}")
        assert diff < 1e-6


def test_a_dropped_caption_is_empty_for_both_text_encoders(xl, data, tmp_path):
    stage = FinetuneStage(config("finetune", tmp_path / "run", xl[1], data, caption_dropout=1.0), CPU)
    items = [stage.dataset()[i] for i in range(2)]
    assert all(item[1] == "" and isinstance(item[2], ImageGeometry) for item in items)
    batch = stage.collate(items)
    assert batch["ids"].tolist() == stage.tokenizer(["", ""]) and batch["ids_2"].tolist() == stage.tokenizer_2(["", ""])


def test_what_sdxl_does_not_support_yet_fails_first(xl, data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="not supported with an SDXL base yet: train_text_encoder"):
        train("finetune", config("finetune", run, xl[1], data, train_text_encoder=True))
    with pytest.raises(ValueError, match="the unet stage trains a new U-Net; .* use the finetune or lora stage"):
        train("unet", config("unet", run, xl[1], data))
    with pytest.raises(ValueError, match="--text cannot be used with the SDXL base"):
        train("finetune", config("finetune", run, xl[1], data, text=str(xl[1])))
    cache = tmp_path / "cache.safetensors"
    cache.write_bytes(b"")
    with pytest.raises(ValueError, match="original size and crop, which the latent cache"):
        train("finetune", config("finetune", run, xl[1], cache))
    with pytest.raises(ValueError, match="does not train SDXL embeddings yet"):
        train("embedding", config("embedding", run, xl[1], data, token="<xl-tok>", init_word="cat"))
    assert not run.exists()


# ---------------------------------------------------------------------------------------------
# finetune


def _held_out_losses(stage_class, cfg: TrainConfig, run_once) -> tuple[float, float]:
    """The stage's held-out loss (fixed noise and timesteps: comparable between runs) of the
    starting point, and of the model `run_once()` trains and checkpoints at its last step."""
    stage = stage_class(cfg, CPU)
    with torch.no_grad():
        before = stage.evaluate(stage.trainable())["loss"]
    checkpoint = run_once()
    stage.trainable().load_state_dict(read_state_dict(checkpoint / "model.safetensors"))
    with torch.no_grad():
        after = stage.evaluate(stage.trainable())["loss"]
    return before, after


def test_finetune_loss_falls(xl, data, tmp_path):
    """20 steps on buckets of three aspect ratios; the held-out loss (training items: the folder is
    too small to hold some out) falls, and the training loss with it."""
    cfg = config("finetune", tmp_path / "run", xl[1], data, buckets=True, bucket_step=8, steps=21)
    before, after = _held_out_losses(FinetuneStage, cfg, lambda: train(FastFinetune, cfg, until=20))
    values = losses(tmp_path / "run")
    print(
        f"sdxl finetune: held-out loss {before:.4f} -> {after:.4f}; training loss {values[0]:.3f} -> {values[-1]:.3f}"
    )
    assert len(values) == 20 and after < 0.85 * before and sum(values[-5:]) < sum(values[:5])
    saved = read_state_dict(tmp_path / "run" / "checkpoints" / "step_0000020" / "model.safetensors")
    base = xl[2].unet.state_dict()
    assert saved.keys() == base.keys() and any(not torch.equal(saved[k], base[k]) for k in saved)


def test_finetune_export_loads_back(xl, data, tmp_path):
    """The finished run writes a model that load_pipeline reads, whose U-Net is the EMA."""
    run = tmp_path / "run"
    exported = train(FastFinetune, config("finetune", run, xl[1], data, steps=2, save_every=2))
    assert exported == run / "export" / "model.safetensors"
    pipe = load_pipeline(exported)
    assert pipe.spec.is_sdxl and pipe.spec.default_size == 32 and pipe.text_encoder_2 is not None
    base = xl[2]
    for name in ("text_encoder", "text_encoder_2", "vae"):  # the frozen parts are the base's
        ours, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), name
    assert (run / "samples" / "step_000002.png").read_bytes()[:4] == b"\x89PNG"
    ema = read_state_dict(run / "checkpoints" / "step_0000002" / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())


def _same_checkpoints(a: Path, b: Path, step: int) -> None:
    for name in ("model", "ema", "optimizer"):
        x, y = (read_state_dict(r / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors") for r in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("stage", ["finetune", "lora"])
def test_resume_is_bitwise_exact(xl, data, tmp_path, stage):
    common = dict(steps=6, save_every=2, grad_accum=2, batch_size=2, ema_decay=0.9)
    train(stage, config(stage, tmp_path / "straight", xl[1], data, **common), until=4)
    split = config(stage, tmp_path / "split", xl[1], data, **common)
    train(stage, split, until=2)
    train(stage, split, resume="latest", until=4)
    _same_checkpoints(tmp_path / "straight", tmp_path / "split", 4)


RUNNER = """
import sys
import torch.distributed as dist
from stablediff.train.config import TrainConfig
from stablediff.train.trainer import train
dist.init_process_group("gloo")  # one group for both runs
for path in sys.argv[1:]:
    config = TrainConfig.from_json(open(path).read())
    train(config.stage, config, device="cpu", until=3)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes_equal_one_with_twice_the_batch(xl, data, tmp_path):
    # lr 5e-4: Adam turns rounding differences (the order of the gradient reduction) in gradients near
    # its eps into whole steps (see test_train_lora); at 1e-3 one LoRA weight differs by 1.04e-4
    common = dict(steps=4, save_every=3, ema_decay=0.0, lr=5e-4)
    paths = []
    for stage in ("finetune", "lora"):
        path = tmp_path / f"{stage}.json"
        path.write_text(config(stage, tmp_path / f"{stage}-two", xl[1], data, batch_size=2, **common).to_json())
        paths.append(str(path))
    (tmp_path / "runner.py").write_text(RUNNER)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", str(tmp_path / "runner.py"), *paths]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("finetune", "lora"):
        one = tmp_path / f"{stage}-one"
        train(stage, config(stage, one, xl[1], data, batch_size=4, **common), device="cpu", until=3)
        a, b = (
            read_state_dict(r / "checkpoints" / "step_0000003" / "model.safetensors")
            for r in (tmp_path / f"{stage}-two", one)
        )
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"sdxl {stage}, 2 processes x 2 vs 1 process x 4: max abs difference {worst:.3g}")
        assert a.keys() == b.keys() and worst <= 1e-4
        assert losses(tmp_path / f"{stage}-two") == pytest.approx(losses(one), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# lora


def test_lora_trains_and_its_file_reads_back_in_ours_and_in_diffusers(xl, data, tmp_path):
    run = tmp_path / "run"
    cfg = config("lora", run, xl[1], data, steps=10)
    FastLora.built.clear()
    outputs = []
    before, after = _held_out_losses(
        LoraStage, cfg, lambda: outputs.append(train(FastLora, cfg)) or run / "checkpoints" / "step_0000010"
    )
    exported, stage, values = outputs[0], FastLora.built[-1], losses(run)
    print(f"sdxl lora: held-out loss {before:.4f} -> {after:.4f}; training loss {values[0]:.3f} -> {values[-1]:.3f}")
    assert len(values) == 10 and after < 0.85 * before and sum(values[-3:]) < sum(values[:3])
    parts = {part for (part, _), _ in stage.trainable().network.items()}
    assert parts == {"unet", "text", "text_2"}
    # CLIP-L's last layer is never read by SDXL (context: penultimate; pooled: bigG's), so not adapted
    text_layers = {int(m.split(".")[2]) for (p, m), _ in stage.trainable().network.items() if p == "text"}
    assert text_layers == {0, 1}

    meta = safetensors.safe_open(str(exported), "pt").metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "4"
    keys = set(safetensors.safe_open(str(exported), "pt").keys())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight" in keys  # LoCon, SGM-named
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc1.lora_down.weight" in keys
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks")) for k in keys)

    pipe = xl[2]
    before = _ours(pipe)
    pipe.load_lora(exported)
    try:
        after = _ours(pipe)
        assert all((a - b).abs().max() > 0 for a, b in zip(before, after, strict=True))
        reference_pipe = _fresh(xl)
        reference_pipe.load_lora_weights(str(exported))
        _assert_matches("trained sdxl lora", _theirs(reference_pipe, pipe), after)
    finally:
        pipe.unload_lora()
    # the file holds the EMA adapters of the last checkpoint
    ema = read_state_dict(run / "checkpoints" / "step_0000010" / "ema.safetensors")
    written = read_state_dict(exported)
    for (part, module), _ in stage.trainable().network.items():
        stem, key = stage.table.kohya_name(part, module), f"network.adapters.{part}:{module.replace('.', '/')}"
        assert torch.equal(written[f"{stem}.lora_down.weight"], ema[f"{key}.down"])
        assert torch.equal(written[f"{stem}.lora_up.weight"], ema[f"{key}.up"])
