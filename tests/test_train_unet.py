"""The U-Net stage through the real trainer: tiny networks, 32 px shapes, a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablediff.loading import load_pipeline, save
from stablediff.params import GenerationParams
from stablediff.train.config import TrainConfig
from stablediff.train.data import encode_latent_cache
from stablediff.train.exports import TEXT_PART, TRAIN_CONFIG_KEY, VAE_PART, frozen_parts
from stablediff.train.optim import WarmupCosine, lr_at, make_optimizer
from stablediff.train.stages.unet import FinetuneStage, UNetStage, draw_timesteps
from stablediff.train.trainer import train
from stablediff.weights.io import read_metadata, read_state_dict, write_safetensors

CPU = torch.device("cpu")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine, OpenMP threads waiting for each other make
    these tiny networks 10-100x slower. Subprocesses get OMP_NUM_THREADS=1 (same thread count,
    so the same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FastSamples(UNetStage):
    sample_steps = 3  # the grid is still 8 images through the real pipeline, just fewer steps


def unet_config(out: Path, **overrides) -> TrainConfig:
    values = dict(
        stage="unet",
        data="shapes",
        out=str(out),
        shapes_size=4,
        resolution=32,
        batch_size=4,
        steps=16,
        lr=2e-3,
        warmup_steps=2,
        ema_decay=0.9,
        log_every=1,
        save_every=100,
        eval_every=8,
        eval_size=4,
        seed=1,
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """16 steps on 4 shapes (one fixed batch of 4 each step), then sample and export."""
    run = tmp_path_factory.mktemp("unet") / "run"
    exported = train(FastSamples, unet_config(run))
    return run, exported


def test_loss_goes_down_on_a_fixed_batch(shapes_run):
    run, _ = shapes_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == 16
    first, last = sum(losses[:3]) / 3, sum(losses[-4:]) / 4
    print(f"loss: first 3 steps {first:.3f}, last 4 steps {last:.3f}")
    assert last < 0.6 * first
    evals = json.loads((run / "eval.json").read_text())["history"]
    assert [e["step"] for e in evals] == [8, 16] and evals[1]["loss"] < evals[0]["loss"]
    assert (run / "samples" / "step_000016.png").read_bytes()[:4] == b"\x89PNG"


def test_export_loads_with_load_pipeline_and_generates(shapes_run):
    run, exported = shapes_run
    assert exported == run / "export" / "model.safetensors"
    assert (run / "export" / "tokenizer" / "vocab.json").is_file()
    meta = read_metadata(exported)
    assert TrainConfig.from_json(meta[TRAIN_CONFIG_KEY]) == unet_config(run)
    pipe = load_pipeline(exported)
    assert pipe.spec.unet.context_dim == pipe.spec.text.width and pipe.spec.default_size == 32
    ema = read_state_dict(run / "checkpoints" / "step_0000016" / "ema.safetensors")
    for key, value in pipe.unet.state_dict().items():  # the exported U-Net is the EMA
        assert torch.equal(value, ema[key]), key
    image = pipe.generate(GenerationParams(prompt="a red circle", width=32, height=32, steps=2, seed=0))[0]
    assert image.size == (32, 32)


RESUME = """
import sys
from stablediff.train.config import TrainConfig
from stablediff.train.trainer import train
train("unet", TrainConfig.from_json(open(sys.argv[1]).read()), resume="latest", until=4)
"""


def test_resume_in_a_new_process_is_bitwise_exact(tmp_path):
    common = dict(
        steps=8,
        save_every=2,
        eval_every=0,
        prediction_type="v_prediction",
        min_snr_gamma=5.0,
        grad_accum=2,
        batch_size=2,
    )
    train("unet", unet_config(tmp_path / "straight", **common), until=4)
    split = unet_config(tmp_path / "split", **common)
    train("unet", split, until=2)
    (tmp_path / "split.json").write_text(split.to_json())
    done = subprocess.run(
        [sys.executable, "-c", RESUME, str(tmp_path / "split.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model", "ema", "optimizer"):
        a = read_state_dict(tmp_path / "straight" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        b = read_state_dict(tmp_path / "split" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name} {key}"


def test_draw_timesteps_with_a_high_noise_share():
    plain = draw_timesteps(4000, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(0)))
    t = draw_timesteps(4000, 1000, torch.Generator().manual_seed(0), high_fraction=0.5, high_from=700)
    assert 0 <= int(t.min()) and int(t.max()) < 1000
    share = float((t >= 700).float().mean())  # half drawn from [700, 1000), the other half 30% there too
    assert abs(share - 0.65) < 0.03, share
    assert int(draw_timesteps(100, 1000, torch.Generator(), high_fraction=1.0, high_from=700).min()) >= 700
    with pytest.raises(ValueError, match=r"high_noise_from must be in \[0, 1000\) for a 1000-step schedule, got 1000"):
        draw_timesteps(4, 1000, torch.Generator(), high_fraction=0.5, high_from=1000)
    with pytest.raises(ValueError, match=r"high_noise_fraction must be in \[0, 1\], got 1.5"):
        TrainConfig(high_noise_fraction=1.5)
    with pytest.raises(ValueError, match="snr_floor=6.0 must not exceed min_snr_gamma=5.0"):
        TrainConfig(min_snr_gamma=5.0, snr_floor=6.0)


def test_bad_data_is_a_clear_error_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="training data .*missing.* does not exist"):
        train("unet", unet_config(run, data=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable captioned images"):
        train("unet", unet_config(run, data=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="--data is required"):
        train("unet", unet_config(run, data=""))
    with pytest.raises(ValueError, match="unknown U-Net size 'huge'"):
        train("unet", unet_config(run, model="huge"))
    assert not run.exists()


def test_latent_cache_data_and_a_cache_of_another_vae(tmp_path):
    from stablediff.train.data import ShapesPairs
    from stablediff.train.stages.vae import VAE_SIZES

    config = unet_config(
        tmp_path / "run", data=str(tmp_path / "cache.safetensors"), eval_size=1, steps=2, caption_dropout=0.0
    )
    vae = frozen_parts(config, CPU).vae
    encode_latent_cache(ShapesPairs(4, 0, 32), vae, tmp_path / "cache.safetensors")
    stage = UNetStage(config, CPU)
    assert stage.latents and len(stage.dataset()) == 4
    batch = stage.collate([stage.dataset()[i] for i in range(2)])
    assert batch["x"].shape == (2, 4, 16, 16) and batch["ids"].shape == (2, 77)
    loss, _ = stage.loss(stage.unet, batch, 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    from stablediff.models.vae import AutoencoderKL

    encode_latent_cache(ShapesPairs(4, 0, 32), AutoencoderKL(VAE_SIZES["tiny"]), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="encoded with another VAE"):
        UNetStage(unet_config(tmp_path / "run", data=str(tmp_path / "other.safetensors")), CPU)


def test_trained_vae_and_text_exports_are_picked_up(tmp_path):
    from stablediff.models.clip import CLIPTextConfig, CLIPTextModel
    from stablediff.models.vae import AutoencoderKL, VAEConfig
    from stablediff.tokenizer import CLIPTokenizer

    vae_cfg = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, z_channels=3, scaling_factor=0.7)
    export = tmp_path / "vae_run" / "export"
    export.mkdir(parents=True)
    write_safetensors(
        AutoencoderKL(vae_cfg).state_dict(),
        export / VAE_PART.file,
        {VAE_PART.config_key: json.dumps(vae_cfg.to_dict())},
    )
    text_cfg = CLIPTextConfig(width=24, layers=2, heads=2)
    export = tmp_path / "text_run" / "export"
    export.mkdir(parents=True)
    write_safetensors(
        CLIPTextModel(text_cfg).state_dict(),
        export / TEXT_PART.file,
        {TEXT_PART.config_key: json.dumps(text_cfg.to_dict())},
    )
    CLIPTokenizer.default().save(export / "tokenizer")
    stage = UNetStage(
        unet_config(tmp_path / "run", vae=str(tmp_path / "vae_run"), text=str(tmp_path / "text_run")), CPU
    )
    assert stage.vae.config == vae_cfg and stage.text_encoder.config == text_cfg
    assert stage.unet.config.in_channels == 3 and stage.unet.config.context_dim == 24
    assert not any(p.requires_grad for p in [*stage.vae.parameters(), *stage.text_encoder.parameters()])


def test_finetune_starts_from_the_base_model(tmp_path):
    base = tmp_path / "base.safetensors"
    save(load_pipeline("tiny", seed=7), base)
    with pytest.raises(ValueError, match="needs --base"):
        FinetuneStage(unet_config(tmp_path / "run", stage="finetune"), CPU)
    config = unet_config(tmp_path / "run", stage="finetune", base=str(base), steps=2, eval_every=0)
    stage = FinetuneStage(config, CPU)
    reference = load_pipeline(base)
    for key, value in reference.unet.state_dict().items():
        assert torch.equal(stage.unet.state_dict()[key], value), key
    assert stage.vae.config == reference.vae.config and stage.unet.training
    checkpoint = train(FinetuneStage, config, until=1)
    assert checkpoint.name == "step_0000001"


def test_text_encoder_lr_ratio_scales_only_the_text_encoders_groups(tmp_path):
    base = tmp_path / "base.safetensors"
    save(load_pipeline("tiny", seed=7), base)
    config = unet_config(
        tmp_path / "run", stage="finetune", base=str(base), train_text_encoder=True, text_encoder_lr_ratio=0.1
    )
    stage = FinetuneStage(config, CPU)
    optimizer = make_optimizer(stage.trainable(), config, stage.lr_scales())
    WarmupCosine(optimizer, config).apply(5)
    lr = lr_at(5, config)
    text = {id(p) for p in stage.text_encoder.parameters()}
    for group in optimizer.param_groups:  # every parameter is in a group of its network's lr
        expected = [0.1 * lr if id(p) in text else lr for p in group["params"]]
        assert expected == [pytest.approx(group["lr"])] * len(expected)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(stage.trainable().parameters()))
    assert {g["lr_scale"] for g in optimizer.param_groups} == {1.0, 0.1}
    with pytest.raises(ValueError, match="text_encoder_lr_ratio needs train_text_encoder = true"):
        unet_config(tmp_path, text_encoder_lr_ratio=0.5)
    with pytest.raises(ValueError, match="text_encoder_lr_ratio must be > 0, got 0.0"):
        unet_config(tmp_path, train_text_encoder=True, text_encoder_lr_ratio=0.0)


def test_train_text_encoder_trains_both_networks_and_exports_them(tmp_path):
    base = tmp_path / "base.safetensors"
    save(load_pipeline("tiny", seed=7), base)
    reference = load_pipeline(base)
    config = unet_config(
        tmp_path / "run",
        stage="finetune",
        base=str(base),
        steps=4,
        eval_every=4,
        save_every=4,
        ema_decay=0.0,
        train_text_encoder=True,
    )
    exported = train(FinetuneStage, config)
    saved = read_state_dict(tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder"}
    pipe = load_pipeline(exported)
    for name in ("unet", "text_encoder"):  # both were optimised, and the export holds the trained ones
        before, after = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        moved = max(float((after[k] - before[k]).abs().max()) for k in before)
        print(f"{name}: largest weight change {moved:.2e}")
        assert moved > 1e-4
        for key, value in after.items():
            assert torch.equal(value, saved[f"{name}.{key}"]), key
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["latest"]["step"] == 4
    with pytest.raises(ValueError, match="train_text_encoder is for the unet and finetune stages, not 'vae'"):
        TrainConfig(stage="vae", train_text_encoder=True)
