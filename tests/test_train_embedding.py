"""The embedding stage (textual inversion) through the real trainer, on the tiny SD1-style reference
model of reference.py as --base (a diffusers folder): 32 px shapes, a few steps each, one thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import build_reference, save_reference_folder

from stablediff.cli import main
from stablediff.embeddings import read_embedding
from stablediff.loading import load_pipeline
from stablediff.train.config import TrainConfig
from stablediff.train.exports import TRAIN_CONFIG_KEY
from stablediff.train.stages.embedding import EmbeddingStage
from stablediff.train.trainer import train
from stablediff.weights.io import read_metadata, read_state_dict

CPU = torch.device("cpu")
TOKEN = "<shp>"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as tests/test_train_unet.py uses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FastEmbedding(EmbeddingStage):
    sample_steps = 2  # the end-of-run grid still goes through the real pipeline
    built: list[EmbeddingStage] = []

    def __init__(self, config, device):
        super().__init__(config, device)
        FastEmbedding.built.append(self)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_reference_folder(tmp_path_factory.mktemp("base") / "sd1-tiny", *build_reference("sd1"))


def embedding_config(out: Path, base: Path, **overrides) -> TrainConfig:
    values = dict(
        stage="embedding",
        base=str(base),
        data="shapes",
        out=str(out),
        token=TOKEN,
        init_word="shape",
        num_vectors=3,
        shapes_size=4,
        resolution=32,
        batch_size=4,
        steps=10,
        lr=5e-2,
        warmup_steps=1,
        ema_decay=0.5,
        log_every=1,
        save_every=100,
        eval_every=5,
        eval_size=4,
        seed=1,
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory, base):
    """10 steps on 4 shapes (one fixed batch each step), then sample and export."""
    run = tmp_path_factory.mktemp("embedding") / "run"
    FastEmbedding.built.clear()
    exported = train(FastEmbedding, embedding_config(run, base))
    return run, exported, FastEmbedding.built[-1]


def test_loss_falls_and_only_the_vectors_train(embedding_run, base):
    run, _, stage = embedding_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "lr" in r]
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    print(f"embedding loss: first 2 steps {first:.4f}, last 3 steps {last:.4f}")
    assert len(losses) == 10 and last < 0.95 * first
    reference = load_pipeline(base)
    for name in ("unet", "text_encoder", "vae"):  # the frozen base is bit-identical after training
        ours, theirs = getattr(stage, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    saved = read_state_dict(run / "checkpoints" / "step_0000010" / "model.safetensors")
    assert list(saved) == ["vectors"] and saved["vectors"].shape == (3, 32)
    assert (run / "samples" / "step_000010.png").read_bytes()[:4] == b"\x89PNG"


def test_vectors_start_as_the_init_word_and_place_as_in_the_pipeline(base, tmp_path):
    """Two-token init word over three vectors: cycled. The training context of a caption equals
    the pipeline's prompt encoding with the same vectors loaded as an embedding file."""
    stage = EmbeddingStage(embedding_config(tmp_path / "run", base, init_word="red circle"), CPU)
    ids = stage.tokenizer.encode("red circle")
    table = stage.text_encoder.embeddings.token_embedding.weight
    assert len(ids) == 2 and torch.equal(stage.trainable().vectors, table[[ids[0], ids[1], ids[0]]])
    batch = stage.collate([(torch.zeros(3, 32, 32), "a red circle"), (torch.zeros(3, 32, 32), "")])
    assert batch["fixes"] == [[1], [1]]  # "<shp>, a red circle" and "<shp>": after BOS
    with torch.no_grad():
        context = stage.trainable()(stage.text_encoder, batch["ids"], batch["fixes"])
        pipe = stage.pipeline(stage.trainable())
        for row, text in enumerate((f"{TOKEN}, a red circle", TOKEN)):
            assert torch.equal(context[row : row + 1], pipe.encode_prompt(text)[0])
    assert stage.caption_text("a (red) circle") == r"<shp>, a \(red\) circle"  # brackets stay literal


def test_export_loads_in_ours_and_in_diffusers(embedding_run, base):
    from diffusers import StableDiffusionPipeline

    run, exported, stage = embedding_run
    assert exported == run / "export" / "shp.safetensors"  # A1111 calls it by the file name
    meta = read_metadata(exported)
    assert meta["name"] == TOKEN and meta["step"] == "10" and meta["sd_checkpoint_name"] == "sd1-tiny"
    assert json.loads(meta[TRAIN_CONFIG_KEY])["base"] == "sd1-tiny"
    ema = read_state_dict(run / "checkpoints" / "step_0000010" / "ema.safetensors")["vectors"]
    assert torch.equal(read_embedding(exported).vectors, ema)  # the EMA vectors
    pipe = load_pipeline(base)
    prompt = f"a photo of {TOKEN}"
    plain = pipe.encode_prompt(prompt)[0]
    assert pipe.load_embedding(exported, TOKEN) == TOKEN
    ours = pipe.encode_prompt(prompt)[0]
    assert not torch.equal(plain, ours)
    theirs_pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    theirs_pipe.load_textual_inversion(str(exported), token=TOKEN)
    with torch.no_grad():
        theirs = theirs_pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    diff = float((theirs - ours).abs().max())
    print(f"exported embedding, diffusers vs ours: prompt embeddings max abs diff {diff:.2e}")
    assert theirs.shape == ours.shape and diff < 1e-5


def test_resume_is_bitwise_exact(tmp_path, base):
    common = dict(steps=6, save_every=2, eval_every=0, grad_accum=2, batch_size=2, ema_decay=0.9)
    train("embedding", embedding_config(tmp_path / "straight", base, **common), until=4)
    split = embedding_config(tmp_path / "split", base, **common)
    train("embedding", split, until=2)
    train("embedding", split, resume="latest", until=4)
    for name in ("model", "ema", "optimizer"):
        a = read_state_dict(tmp_path / "straight" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        b = read_state_dict(tmp_path / "split" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


RUNNER = """
import sys
from stablediff.train.config import TrainConfig
from stablediff.train.trainer import train
train("embedding", TrainConfig.from_json(open(sys.argv[1]).read()), device="cpu", until=3)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes_equal_one_with_twice_the_batch(tmp_path, base):
    """DDP passes each row's vector positions through to the trainable's forward."""
    common = dict(steps=4, save_every=3, eval_every=0, shapes_size=8, ema_decay=0.0)
    (tmp_path / "two.json").write_text(embedding_config(tmp_path / "two", base, batch_size=2, **common).to_json())
    (tmp_path / "runner.py").write_text(RUNNER)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", str(tmp_path / "runner.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(tmp_path / "two.json")], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    train("embedding", embedding_config(tmp_path / "one", base, batch_size=4, **common), device="cpu", until=3)
    a, b = (
        read_state_dict(tmp_path / r / "checkpoints" / "step_0000003" / "model.safetensors") for r in ("two", "one")
    )
    worst = float((a["vectors"] - b["vectors"]).abs().max())
    print(f"embedding stage, 2 processes x 2 vs 1 process x 4: max abs difference {worst:.3g}")
    assert worst <= 1e-5


def test_bad_options_fail_before_any_work(tmp_path, base, capsys):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="the embedding stage needs --base"):
        embedding_config(run, "")
    with pytest.raises(ValueError, match="num_vectors must be >= 1"):
        embedding_config(run, base, num_vectors=0)
    with pytest.raises(ValueError, match="num_vectors must be at most 75"):
        embedding_config(run, base, num_vectors=76)
    with pytest.raises(ValueError, match="needs --token"):
        embedding_config(run, base, init_word="")
    with pytest.raises(ValueError, match=r"must hold \{token\} once"):
        embedding_config(run, base, embedding_template="a photo of {caption}")
    with pytest.raises(ValueError, match="token is for the embedding stage"):
        TrainConfig(stage="lora", base=str(base), token=TOKEN)
    with pytest.raises(ValueError, match="ordinary word of the vocabulary"):
        train("embedding", embedding_config(run, base, token="cat"))
    with pytest.raises(ValueError, match=r"puts '<shp>' beyond the first 75 tokens"):
        long = "{caption} " + "a " * 80 + "{token}"
        train("embedding", embedding_config(tmp_path / "long", base, embedding_template=long))
    args = ["train", "embedding", "--base", str(base), "--data", "shapes", "--out", str(run), "--init-word", "dog"]
    assert main([*args, "--token", "dog"]) == 2
    assert "ordinary word of the vocabulary" in capsys.readouterr().err
    assert not run.exists()


def test_cli_trains_an_embedding(tmp_path, base, capsys):
    run = tmp_path / "run"
    args = ["train", "embedding", "--base", str(base), "--data", "shapes", "--token", TOKEN, "--init-word", "shape"]
    options = ["--steps=2", "--batch_size=2", "--resolution=16", "--shapes_size=4", "--eval_size=2"]
    assert main([*args, "--out", str(run), *options]) == 0
    exported = run / "export" / "shp.safetensors"
    assert capsys.readouterr().out.strip().endswith(str(exported))
    config = json.loads((run / "config.json").read_text())
    assert config["token"] == TOKEN and config["init_word"] == "shape" and config["base"] == str(base)
