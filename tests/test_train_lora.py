"""The lora stage through the real trainer, on the tiny SD1-style reference model of reference.py
as --base (a diffusers folder): 32 px shapes, a few steps each, one intra-op thread.

The exported file is checked against diffusers' own loaders (as tests/test_lora.py does) with one
alpha for every module: diffusers 0.42.1 applies the most common alpha to all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from reference import build_reference, save_reference_folder
from test_buckets import SIZES, write_folder
from test_lora import diffusers_outputs, inputs, our_outputs

from stablediff.cli import main
from stablediff.loading import load_pipeline
from stablediff.lora import ModuleTable, lora_targets
from stablediff.train.config import TrainConfig
from stablediff.train.exports import TRAIN_CONFIG_KEY
from stablediff.train.stages.lora import LoraStage
from stablediff.train.trainer import train
from stablediff.weights.io import read_state_dict

CPU = torch.device("cpu")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as tests/test_train_unet.py (and its subprocesses) use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FastLora(LoraStage):
    sample_steps = 2  # the end-of-run grid still goes through the real pipeline
    built: list[LoraStage] = []

    def __init__(self, config, device):
        super().__init__(config, device)
        FastLora.built.append(self)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_reference_folder(tmp_path_factory.mktemp("base") / "sd1-tiny", *build_reference("sd1"))


def lora_config(out: Path, base: Path, **overrides) -> TrainConfig:
    values = dict(
        stage="lora",
        base=str(base),
        data="shapes",
        out=str(out),
        shapes_size=4,
        resolution=32,
        batch_size=4,
        steps=10,
        lr=1e-2,
        warmup_steps=1,
        ema_decay=0.5,
        log_every=1,
        save_every=100,
        eval_every=5,
        eval_size=4,
        seed=1,
        # every kind of target: attention, ff and projections, LoCon convolutions, the text encoder
        lora_targets="transformer",
        lora_rank=4,
        lora_alpha=2.0,
        lora_conv_rank=4,
        lora_conv_alpha=2.0,
        lora_text_encoder=True,
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base):
    """10 steps on 4 shapes (one fixed batch each step), then sample and export."""
    run = tmp_path_factory.mktemp("lora") / "run"
    FastLora.built.clear()
    exported = train(FastLora, lora_config(run, base))
    return run, exported, FastLora.built[-1]


def test_loss_falls_and_only_the_adapters_train(lora_run, base):
    run, _, stage = lora_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r and "loss" in r and "lr" in r]
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    print(f"lora loss: first 2 steps {first:.4f}, last 3 steps {last:.4f}")
    assert len(losses) == 10 and last < 0.9 * first
    reference = load_pipeline(base)
    for name in ("unet", "text_encoder"):  # the frozen base is bit-identical after training
        ours, theirs = getattr(stage, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert not any(p.requires_grad for p in getattr(stage, name).parameters())
    saved = read_state_dict(run / "checkpoints" / "step_0000010" / "model.safetensors")
    assert saved and all(k.startswith("network.adapters.") for k in saved)
    parts = {k.split(".")[2].split(":")[0] for k in saved}
    assert parts == {"unet", "text"}
    assert (run / "samples" / "step_000010.png").read_bytes()[:4] == b"\x89PNG"


def test_export_loads_in_ours_and_in_diffusers(lora_run, base):
    run, exported, stage = lora_run
    assert exported == run / "export" / "lora.safetensors"
    meta = safetensors.safe_open(str(exported), "pt").metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_sd_model_name"] == "sd1-tiny" and json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    shared = json.loads(meta[TRAIN_CONFIG_KEY])
    assert shared["base"] == "sd1-tiny" and shared["out"] == "run" and shared["lora_rank"] == 4
    assert str(run.parent) not in json.dumps(meta)  # no path of this machine
    pipe = load_pipeline(base)
    before = our_outputs(pipe)
    pipe.load_lora(exported)
    after = our_outputs(pipe)
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    reference = diffusers_outputs("sd1", exported, pipe)
    diffs = [float((a - b).abs().max()) for a, b in zip(reference, after, strict=True)]
    print(f"exported LoRA, diffusers vs ours: U-Net {diffs[0]:.2e}, text encoder {diffs[1]:.2e}")
    assert max(diffs) < ATOL
    assert not torch.equal(reference[0], before[0]) and not torch.equal(reference[1], before[1])  # applied there
    # the file holds the EMA weights of the last checkpoint, under kohya's names
    ema = read_state_dict(run / "checkpoints" / "step_0000010" / "ema.safetensors")
    written = read_state_dict(exported)
    for (part, module), _ in stage.trainable().network.items():
        stem, key = stage.table.kohya_name(part, module), f"network.adapters.{part}:{module.replace('.', '/')}"
        assert torch.equal(written[f"{stem}.lora_down.weight"], ema[f"{key}.down"])
        assert torch.equal(written[f"{stem}.lora_up.weight"], ema[f"{key}.up"])


def test_a_new_lora_adds_nothing_and_is_seeded(base, tmp_path):
    config = lora_config(tmp_path / "run", base)
    stage = LoraStage(config, CPU)
    network = stage.trainable().network
    ups = [a.up for _, a in network.items()]
    assert all(not up.any() for up in ups) and all(a.down.abs().sum() > 0 for _, a in network.items())
    x, t, _, ids = inputs(load_pipeline(base))
    with torch.no_grad():
        plain = stage.unet(x, t, stage.text_encoder(ids))
        hooked = stage.trainable()(stage.slot, stage.unet, stage.text_encoder, x, t, ids)
    assert torch.equal(plain, hooked)
    again = LoraStage(config, CPU).trainable().state_dict()
    assert all(torch.equal(v, again[k]) for k, v in stage.trainable().state_dict().items())
    kinds = {name.rsplit(".", 1)[-1] for _, name in lora_targets(stage.table, "attention")}
    assert kinds == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    table = ModuleTable(stage.unet, stage.text_encoder)
    assert len(lora_targets(table, "transformer", text=True, conv=True)) == len(network.adapters)


def test_resume_is_bitwise_exact(tmp_path, base):
    common = dict(steps=6, save_every=2, eval_every=0, grad_accum=2, batch_size=2, ema_decay=0.9)
    train("lora", lora_config(tmp_path / "straight", base, **common), until=4)
    split = lora_config(tmp_path / "split", base, **common)
    train("lora", split, until=2)
    train("lora", split, resume="latest", until=4)
    for name in ("model", "ema", "optimizer"):
        a = read_state_dict(tmp_path / "straight" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        b = read_state_dict(tmp_path / "split" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, base, monkeypatch):
    """The frozen U-Net recomputes its activations in backward, with the LoRA still hooked on."""
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    common = dict(steps=3, save_every=2, eval_every=0, ema_decay=0.0, batch_size=2)
    for name, flag in (("plain", False), ("checkpointed", True)):
        train("lora", lora_config(tmp_path / name, base, gradient_checkpointing=flag, **common), until=2)
    a, b = (
        read_state_dict(tmp_path / r / "checkpoints" / "step_0000002" / "model.safetensors")
        for r in ("plain", "checkpointed")
    )
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"lora stage, gradient checkpointing vs none: max abs difference {worst:.3g} ({len(calls)} blocks)")
    assert worst <= 1e-6 and calls


RUNNER = """
import sys
from stablediff.train.config import TrainConfig
from stablediff.train.trainer import train
train("lora", TrainConfig.from_json(open(sys.argv[1]).read()), device="cpu", until=3)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes_equal_one_with_twice_the_batch(tmp_path, base):
    # lr 1e-3: Adam turns rounding differences (the order of the gradient reduction) in gradients
    # near its eps into whole steps; at 1e-2 one LoRA weight of ~1e5 differs by 2e-3 after 3 steps.
    common = dict(steps=4, save_every=3, eval_every=0, shapes_size=8, ema_decay=0.0, lr=1e-3)
    (tmp_path / "two.json").write_text(lora_config(tmp_path / "two", base, batch_size=2, **common).to_json())
    (tmp_path / "runner.py").write_text(RUNNER)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", str(tmp_path / "runner.py")]
    result = subprocess.run(
        [*command, str(tmp_path / "two.json")], capture_output=True, text=True, timeout=180, env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    train("lora", lora_config(tmp_path / "one", base, batch_size=4, **common), device="cpu", until=3)
    a, b = (
        read_state_dict(tmp_path / r / "checkpoints" / "step_0000003" / "model.safetensors") for r in ("two", "one")
    )
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"lora stage, 2 processes x 2 vs 1 process x 4: max abs difference {worst:.3g}")
    assert worst <= 1e-4
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("two", "one")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bad_options_fail_before_any_work(tmp_path, base, capsys):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="the lora stage needs --base"):
        lora_config(run, "")
    with pytest.raises(ValueError, match="lora_text_encoder is for the lora stage"):
        TrainConfig(stage="finetune", base=str(base), lora_text_encoder=True)
    with pytest.raises(ValueError, match="lora_targets='ff' is not one of"):
        lora_config(run, base, lora_targets="ff")
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        lora_config(run, base, lora_rank=0)
    with pytest.raises(ValueError, match="pass --prediction_type=epsilon"):
        train("lora", lora_config(run, base, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="rank 99999"):
        train("lora", lora_config(run, base, lora_rank=99999))
    assert main(["train", "lora", "--data", "shapes", "--out", str(run)]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert not run.exists()


def test_cli_trains_on_bucketed_captioned_images(tmp_path, base, capsys):
    """`stablediff train lora --base MODEL --data DIR --out RUN` on a folder of three aspect ratios."""
    write_folder(tmp_path / "data", SIZES)
    run = tmp_path / "run"
    args = ["train", "lora", "--base", str(base), "--data", str(tmp_path / "data"), "--out", str(run)]
    options = ["--steps=3", "--batch_size=2", "--resolution=32", "--buckets=true", "--bucket_step=8"]
    assert main([*args, *options, "--lora_rank=2", "--eval_every=0", "--warmup_steps=1"]) == 0, capsys.readouterr()
    exported = run / "export" / "lora.safetensors"
    assert capsys.readouterr().out.strip().endswith(str(exported))
    pipe = load_pipeline(base)
    pipe.load_lora(exported)
    assert json.loads((run / "config.json").read_text())["buckets"] is True
