"""The trainer loop on a toy stage (linear regression): data order, accumulation, resume, faults,
non-finite losses, checkpoints, torch.distributed. Every run is a few milliseconds per step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from stablediff.train import checkpoint as ckpt
from stablediff.train.config import TrainConfig
from stablediff.train.distributed import rank_randn
from stablediff.train.optim import lr_at
from stablediff.train.order import Position, RankBatches, permutation
from stablediff.train.stage import Stage
from stablediff.train.stages import STAGES, get_stage
from stablediff.train.trainer import NonFiniteError, train
from stablediff.weights.io import CheckpointError, read_state_dict

TESTS = Path(__file__).resolve().parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine, OpenMP threads waiting for each other make
    tiny networks 10-100x slower. Subprocesses get OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ToyStage(Stage):
    """y = x . w + b + 0.1 sin(3 x0) for 10 examples in R^4; a linear model with a LayerNorm (so
    that EMA, norms and both AdamW groups are exercised). With `noisy`, the loss adds noise to the
    targets from the trainer's generator (so resume exactness covers it); `nan_steps` makes the
    loss NaN at those steps."""

    name = "toy"
    noisy = True
    nan_steps: frozenset[int] = frozenset()
    size = 10

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(self.size, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 + 0.1 * torch.sin(3 * self.x[:, 0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 1))
        self.net.gradient_checkpointing = False  # the trainer sets it from the config

    def trainable(self) -> nn.Module:
        return self.net

    def dataset(self):
        return [(self.x[i], self.y[i]) for i in range(self.size)]

    def loss(self, model, batch, step, generator):
        x, y = batch
        if self.noisy:
            y = y + 0.01 * rank_randn(generator, y.shape)
        loss = (model(x.to(self.device)).squeeze(1) - y.to(self.device)).pow(2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        return loss, {"batch_mean": float(y.mean())}

    def evaluate(self, model):
        return {"loss": float((model(self.x).squeeze(1) - self.y).pow(2).mean())}

    def sample(self, model, path):
        path.write_bytes(b"\x89PNG toy")

    def export(self, model, out_dir):
        from stablediff.weights.io import write_safetensors

        out_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(model.state_dict(), out_dir / "toy.safetensors")
        return out_dir / "toy.safetensors"


class QuietToy(ToyStage):
    noisy = False


class QuietNan(QuietToy):
    nan_steps = frozenset({2})


class NoisyNan(ToyStage):
    nan_steps = frozenset({2})


def toy_config(out: Path, **overrides) -> TrainConfig:
    values = dict(
        stage="unet",
        data="toy",
        out=str(out),
        steps=12,
        batch_size=4,
        lr=0.05,
        warmup_steps=3,
        ema_decay=0.9,
        save_every=4,
        keep_last=2,
        log_every=1,
        eval_every=6,
        sample_every=6,
        seed=3,
    )
    return TrainConfig(**{**values, **overrides})


def final_state(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / ckpt.step_dir_name(step)
    return {name: read_state_dict(folder / f"{name}.safetensors") for name in ("model", "ema", "optimizer")}


def assert_states_equal(a: dict, b: dict) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs"


# ---------------------------------------------------------------------------------------------
def test_data_order_is_shared_by_any_world_size_and_resumes_mid_stream():
    one = RankBatches(10, 8, seed=5).global_batches()
    two = [RankBatches(10, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    first = [next(one) for _ in range(5)]  # 40 examples: four epochs, batches straddle them
    shares = [iter(t) for t in two]
    for batch in first:
        parts = [next(s) for s in shares]
        assert sorted(parts[0] + parts[1]) == sorted(batch)
        assert parts[0] == batch[0::2] and parts[1] == batch[1::2]
    flat = [key for batch in first for key in batch]
    for epoch in range(4):
        assert sorted(i for e, i in flat if e == epoch) == list(range(10))  # each epoch is a permutation
        assert [i for e, i in flat if e == epoch] == permutation(10, 5, epoch)
    later = RankBatches(10, 8, seed=5, start=Position().advance(16, 10)).global_batches()
    assert next(later) == first[2]
    assert Position(1, 6).advance(8, 10) == Position(2, 4)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(lr=1.0, warmup_steps=4, steps=14, lr_min_ratio=0.1)
    assert [lr_at(s, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, c) == pytest.approx(1.0)
    assert lr_at(9, c) == pytest.approx(0.55)
    assert lr_at(14, c) == pytest.approx(0.1) and lr_at(100, c) == pytest.approx(0.1)


def test_run_writes_its_outputs_and_learns(tmp_path):
    seen = []
    exported = train(
        ToyStage,
        toy_config(tmp_path / "run", steps=30),
        progress=lambda step, total, metrics: seen.append((step, total, metrics["loss"])),
    )
    run = tmp_path / "run"
    assert exported == run / "export" / "toy.safetensors" and exported.is_file()
    assert [s for s, _, _ in seen] == list(range(1, 31)) and seen[0][1] == 30
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "event" not in r]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "images_per_s", "batch_mean", "skipped_steps"} <= train_records[0].keys()
    assert train_records[-1]["loss"] < 0.2 * train_records[0]["loss"]
    evals = json.loads((run / "eval.json").read_text())
    assert [e["step"] for e in evals["history"]] == [6, 12, 18, 24, 30]
    assert evals["history"][-1]["loss"] < evals["history"][0]["loss"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_{s:06d}.png" for s in (6, 12, 18, 24, 30)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000028", "step_0000030"]
    assert TrainConfig.from_json((run / "config.json").read_text()) == toy_config(run, steps=30)
    pytest.importorskip("matplotlib")
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_is_exact(tmp_path):
    # grad_accum 2, batches straddling epochs, noise from the loss generator, EMA, clipping.
    config = dict(grad_accum=2, grad_clip=0.5)
    train(ToyStage, toy_config(tmp_path / "a", **config))
    train(ToyStage, toy_config(tmp_path / "b", **config), until=5)
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "step_0000005"
    train(ToyStage, toy_config(tmp_path / "b", **config), resume="latest")
    assert_states_equal(final_state(tmp_path / "a", 12), final_state(tmp_path / "b", 12))
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
        if "event" not in json.loads(line)
    ]
    assert steps == list(range(1, 13))  # one line per step although the run was cut at step 5


def test_grad_accum_equals_a_larger_batch(tmp_path):
    train(QuietToy, toy_config(tmp_path / "a", batch_size=2, grad_accum=2, steps=6))
    train(QuietToy, toy_config(tmp_path / "b", batch_size=4, grad_accum=1, steps=6))
    a, b = final_state(tmp_path / "a", 6), final_state(tmp_path / "b", 6)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-6, rtol=0)


def test_data_loader_workers_do_not_change_the_run(tmp_path):
    short = dict(steps=3, eval_every=0, sample_every=0, save_every=100)
    train(ToyStage, toy_config(tmp_path / "a", **short))
    train(ToyStage, toy_config(tmp_path / "b", num_workers=1, **short))
    assert_states_equal(final_state(tmp_path / "a", 3), final_state(tmp_path / "b", 3))


def test_bf16_autocast_and_gradient_checkpointing_flag(tmp_path):
    stages = []

    def factory(config, device):
        stages.append(ToyStage(config, device))
        return stages[-1]

    train(factory, toy_config(tmp_path / "run", steps=3, mixed_precision="bf16", gradient_checkpointing=True))
    assert stages[0].net.gradient_checkpointing is True
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_bf16_kernels_warns(tmp_path, monkeypatch, caplog, fast):
    # On AVX2 bf16 autocast is emulated op by op (a VAE stage ran at 0.7 img/s, not ~20 in float32).
    monkeypatch.setattr("stablediff.train.trainer.cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level("WARNING", logger="stablediff.train.trainer"):
        train(ToyStage, toy_config(tmp_path / "run", steps=1, mixed_precision="bf16"))
    warned = [r.getMessage() for r in caplog.records if "without bf16 kernels" in r.getMessage()]
    assert len(warned) == (0 if fast else 1), warned
    assert fast or "mixed_precision='no'" in warned[0]


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    class NanAt7(ToyStage):
        nan_steps = frozenset({7})

    with pytest.raises(NonFiniteError, match="at step 8 "):  # the 8th step (stage.loss gets 0-based 7)
        train(NanAt7, toy_config(tmp_path / "run"))
    # The checkpoint after 4 steps stands; nothing of step 8 or later was saved.
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000004"]
    assert all(torch.isfinite(t).all() for t in final_state(tmp_path / "run", 4)["model"].values())


def test_non_finite_loss_skip_counts_and_continues(tmp_path):
    class NanAt(ToyStage):
        nan_steps = frozenset({2, 5})

    train(NanAt, toy_config(tmp_path / "run", nonfinite="skip"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "event" not in r}
    assert by_step[3]["skipped"] and by_step[3]["loss"] == "nan" and by_step[6]["skipped"]
    assert by_step[12]["skipped_steps"] == 2 and not by_step[12]["skipped"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000012" / "state.json").read_text())
    assert state["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in final_state(tmp_path / "run", 12)["model"].values())


def test_checkpoint_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    config = toy_config(tmp_path)
    bad = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteError, match=r"step 9: model tensor 'w'"):
        ckpt.save_checkpoint(
            tmp_path, 9, model=bad, ema=None, optimizer={}, rng={}, state={}, config=config, keep_last=2
        )
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_optimizer_state_round_trips_through_tensors_and_json():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "foreach": None}],
    }
    tree, tensors = ckpt.flatten_state(state)
    back = ckpt.unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back["param_groups"] == state["param_groups"] and list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["exp_avg"], torch.ones(2))


@pytest.fixture()
def finished_run(tmp_path):
    run = tmp_path / "run"
    train(ToyStage, toy_config(run, steps=8))
    return run


def test_corrupted_checkpoints_are_refused_clearly(finished_run):
    run, config = finished_run, toy_config(finished_run, steps=8)
    folder = run / "checkpoints" / "step_0000008"
    model = folder / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train(ToyStage, config, resume="latest")
    (folder / "state.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="state.json is not valid JSON"):
        train(ToyStage, config, resume=str(folder))
    (folder / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        train(ToyStage, config, resume=str(folder))
    (folder / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete.*no COMPLETE marker"):
        train(ToyStage, config, resume=str(folder))
    assert ckpt.latest_checkpoint(run).name == "step_0000004"  # an unmarked folder is never "latest"
    with pytest.raises(CheckpointError, match="does not exist"):
        train(ToyStage, config, resume=str(run / "nowhere"))


def test_foreign_checkpoint_is_refused_naming_the_fields(finished_run):
    other = toy_config(finished_run, steps=20, lr=0.02, batch_size=2)  # steps may change, lr and batch not
    fields = r"different training configuration(.|\n)*batch_size: 4 != 2(.|\n)*lr: 0.05 != 0.02"
    with pytest.raises(ValueError, match=fields):
        train(ToyStage, other, resume="latest")
    with pytest.raises(ValueError, match="already has checkpoints"):
        train(ToyStage, toy_config(finished_run, steps=8))


def test_resume_auto_starts_or_continues(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step_0000004").mkdir(parents=True)  # debris only: nothing to resume
    assert (
        train(ToyStage, toy_config(run, steps=4, eval_every=0, sample_every=0), resume="auto", until=2).name
        == "step_0000002"
    )
    train(ToyStage, toy_config(run, steps=4, eval_every=0, sample_every=0), resume="auto")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4]


def test_prune_keeps_the_newest_complete_and_drops_debris(finished_run):
    root = finished_run / "checkpoints"
    shutil.copytree(root / "step_0000008", root / "step_0000010")
    (root / "step_0000010" / "COMPLETE").unlink()  # as if killed between rename and marker
    (root / ".tmp-step_0000011").mkdir()
    assert ckpt.latest_checkpoint(finished_run).name == "step_0000008"
    train(ToyStage, toy_config(finished_run, steps=12), resume="latest")
    assert sorted(p.name for p in root.iterdir()) == ["step_0000008", "step_0000012"]


def test_registry_resolves_lazily_and_names_the_stages():
    assert set(STAGES) == {"tokenizer", "vae", "text", "unet", "finetune", "lora", "embedding"}
    assert get_stage("unet").name == "unet" and get_stage("finetune").name == "finetune"
    with pytest.raises(ValueError, match="unknown training stage 'gan'"):
        get_stage("gan")
    with pytest.raises(ValueError, match="not trained by gradient steps"):
        train("tokenizer", TrainConfig(stage="tokenizer", out="/nonexistent-run"))


# ---------------------------------------------------------------------------------------------
# Processes: SIGKILL while writing a checkpoint; torchrun with two processes.
RUNNER = """
import sys
sys.path.insert(0, {tests!r})
import test_trainer
from stablediff.train.config import TrainConfig
from stablediff.train.trainer import train
config = TrainConfig.from_json(open(sys.argv[1]).read())
name = sys.argv[2] if len(sys.argv) > 2 else "ToyStage"
train(name if name.islower() else getattr(test_trainer, name), config, device="cpu")  # lower case: a real stage
"""


def _runner(tmp_path: Path) -> Path:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(TESTS)))
    return script


def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    config = toy_config(run, steps=100000, save_every=1, keep_last=3, eval_every=0, sample_every=0)
    (tmp_path / "config.json").write_text(config.to_json())
    env = {**ONE_THREAD, ckpt.SLOW_ENV: "0.05"}
    proc = subprocess.Popen([sys.executable, str(_runner(tmp_path)), str(tmp_path / "config.json")], env=env)
    root = run / "checkpoints"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # two complete checkpoints, and the next one half written
            complete = [p for p in root.glob("step_*") if (p / "COMPLETE").is_file()] if root.is_dir() else []
            if len(complete) >= 2 and any(root.glob(".tmp-step_*")):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the training process never reached its third checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = {
        p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in root.glob("step_*") if (p / "COMPLETE").is_file()
    }
    assert len(before) >= 2
    debris = [p.name for p in root.iterdir() if p.name not in before]
    print(f"killed during a checkpoint write; left behind: {debris}")
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == max(before)
    for name, files in before.items():  # every complete checkpoint loads
        ckpt.load_checkpoint(root / name, config)
        assert set(files) >= {"COMPLETE", "model.safetensors", "ema.safetensors", "optimizer.safetensors"}
    last_step = int(latest.name.split("_")[1])
    train(
        ToyStage,
        toy_config(run, steps=last_step + 2, save_every=1, keep_last=3, eval_every=0, sample_every=0),
        resume="latest",
    )
    names = sorted(p.name for p in root.iterdir())
    assert not any(n.startswith(".tmp") for n in names)  # the half-written folder was deleted
    assert names[-3:] == [latest.name, *(ckpt.step_dir_name(last_step + k) for k in (1, 2))]
    for name in names:
        if name in before:  # older complete checkpoints untouched
            assert {f.name: f.read_bytes() for f in (root / name).iterdir()} == before[name]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    # A NaN loss at the third step, skipped: every process skips it, DDP survives a forward without backward.
    common = dict(steps=6, save_every=3, keep_last=5, eval_every=3, sample_every=3, grad_accum=2, nonfinite="skip")
    two = toy_config(tmp_path / "two", batch_size=2, **common)
    (tmp_path / "two.json").write_text(two.to_json())
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(_runner(tmp_path)),
            str(tmp_path / "two.json"),
            "NoisyNan",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    train(NoisyNan, toy_config(tmp_path / "one", batch_size=4, **common))
    a, b = final_state(tmp_path / "two", 6), final_state(tmp_path / "one", 6)
    worst = max(float((a[p][k] - b[p][k]).abs().max()) for p in ("model", "ema") for k in a[p])
    print(f"DDP vs one process: max abs difference {worst:.3g}")
    assert worst <= 1e-6, worst
    # Only rank 0 wrote: one line per step, the same files as the one-process run.
    run = tmp_path / "two"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5, 6, 6]  # training lines, and eval lines at 3 and 6
    assert records[2]["skipped"] and records[-2]["skipped_steps"] == 1
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if "checkpoints" not in p.parts)  # noqa: E731
    assert listing(run) == listing(tmp_path / "one")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    rng = read_state_dict(run / "checkpoints" / "step_0000006" / "rng.safetensors")
    assert sorted(rng) == ["cpu.rank0", "cpu.rank1"]


def _two_processes_vs_one(tmp_path: Path, stage: str, batch_size: int, **fields) -> float:
    """Train `stage` 3 steps with 2 processes of `batch_size` and 1 process of twice that; returns
    the largest difference of the final weights."""

    def config(out: str, batch: int) -> TrainConfig:
        return TrainConfig(
            stage=stage,
            data="shapes",
            model="tiny",
            resolution=32,
            shapes_size=64,
            eval_size=8,
            batch_size=batch,
            steps=3,
            lr=1e-3,
            warmup_steps=1,
            ema_decay=0.0,
            save_every=3,
            log_every=1,
            eval_every=0,
            out=str(tmp_path / out),
            **fields,
        )

    (tmp_path / "two.json").write_text(config("two", batch_size).to_json())
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(_runner(tmp_path)),
            str(tmp_path / "two.json"),
            stage,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    train(stage, config("one", 2 * batch_size), device="cpu")
    a, b = (
        read_state_dict(tmp_path / run / "checkpoints" / ckpt.step_dir_name(3) / "model.safetensors")
        for run in ("two", "one")
    )
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{stage} stage, 2 processes x {batch_size} vs 1 process x {2 * batch_size}: max abs difference {worst:.3g}")
    return worst


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_contrastive_stage_uses_the_whole_global_batch(tmp_path):
    """The text stage under torchrun scores each pair against every process's pairs (gathered
    embeddings, gradients routed back): two processes of 4 train as one process of 8."""
    from stablediff.train.stages.tokenizer import TokenizerStage

    TokenizerStage(TrainConfig(stage="tokenizer", data="shapes", shapes_size=300, vocab_size=600)).fit(tmp_path / "tok")
    worst = _two_processes_vs_one(tmp_path, "text", 4, tokenizer=str(tmp_path / "tok"))
    # Rounding differences only (reduction order), which Adam's first steps magnify to ~2e-5; each
    # process on its own negatives differs by 5e-3 here.
    assert worst <= 1e-4, worst
    rows = {
        run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("two", "one")
    }
    losses = [[r["loss"] for r in rows[run] if "loss" in r] for run in ("two", "one")]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_unet_stage_draws_the_noise_of_one_process(tmp_path):
    """The U-Net stage's posterior samples, timesteps and noise come from the global batch's draw
    (distributed.rank_rows): two processes of 2 train as one process of 4 (5e-3 apart without it)."""
    assert _two_processes_vs_one(tmp_path, "unet", 2) <= 1e-4


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_text_stage_with_hard_negatives_and_unet_with_its_text_encoder(tmp_path):
    """The false captions travel with the global batch too, and DDP wraps a U-Net trained together
    with its text encoder: two processes still train as one."""
    from stablediff.train.stages.tokenizer import TokenizerStage

    TokenizerStage(TrainConfig(stage="tokenizer", data="shapes", shapes_size=300, vocab_size=600)).fit(tmp_path / "tok")
    for name in ("text", "unet"):
        (tmp_path / name).mkdir()
    assert (
        _two_processes_vs_one(tmp_path / "text", "text", 4, tokenizer=str(tmp_path / "tok"), hard_negatives=True)
        <= 1e-4
    )
    assert _two_processes_vs_one(tmp_path / "unet", "unet", 2, train_text_encoder=True) <= 1e-4
