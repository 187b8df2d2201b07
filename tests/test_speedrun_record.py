"""benchmarks/speedrun/speedrun.py: a finished run folder becomes a row of the record (its stage
times, wall time and four scores), and the record is drawn and tabled."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speedrun" / "speedrun.py"


@pytest.fixture()
def speedrun(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("speedrun", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RECORD", tmp_path / "speedrun.json")
    monkeypatch.setattr(module, "PLOT", tmp_path / "speedrun.png")
    return module


def fake_run(folder: Path, start: float) -> Path:
    (folder / "tokenizer" / "tokenizer").mkdir(parents=True)
    vocab = folder / "tokenizer" / "tokenizer" / "vocab.json"
    vocab.write_text("{}")
    os.utime(vocab, (start, start))
    for stage, per_step in (("vae", 0.3), ("unet", 0.6)):
        (folder / stage).mkdir()
        rows = [{"step": s, "loss": 1.0, "time": start + s * per_step} for s in range(100, 1100, 100)]
        (folder / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suites = {
        "single": {"color_shape": 0.5, "position": 0.75},
        "heldout": {"color_shape": 0.25},
        "relation": {"all_correct": 0.125},
    }
    (folder / "eval").mkdir()
    (folder / "eval" / "eval.json").write_text(json.dumps({"suites": suites}))
    export = folder / "model-fp16.safetensors"
    export.write_bytes(b"")
    os.utime(export, (start + 5400, start + 5400))
    return folder


def test_a_run_becomes_a_row_and_the_record_is_drawn(speedrun, tmp_path):
    run = fake_run(tmp_path / "r1", start=1_700_000_000.0)
    row = speedrun.record(run, "more steps", "r1.toml")
    assert row["wall_minutes"] == 90.0
    assert row["stage_minutes"] == {"unet": 10.0, "vae": 5.0}  # 1000 steps at 0.6 s and 0.3 s
    assert list(row["scores"].values()) == [0.5, 0.25, 0.75, 0.125]
    assert row["command"] == f"stablediff train recipe r1.toml --out {run} --package {run}/model.safetensors"
    speedrun.record(run, "again", "r1.toml")
    rows = json.loads(speedrun.RECORD.read_text())
    assert [r["change"] for r in rows] == ["more steps", "again"]
    speedrun.plot(rows)
    assert speedrun.PLOT.stat().st_size > 0
    text = speedrun.table(rows)
    assert f"| {row['machine']} | more steps | 90.0 min | 50.0% | 25.0% | 75.0% | 12.5% |" in text
    assert row["machine"].endswith(torch.backends.cpu.get_cpu_capability())  # AVX2 and AVX-512 rows differ
